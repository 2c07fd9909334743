//! The built-in demo agent: `/ws/agent` on a fresh start (no upstream configured).

mod common;

use common::{within, Backend, Server, Ws};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

both_backends!(
    demo_on_fresh_start,
    demo_cancel_stops_the_stream,
    demo_calculator_refuses_bad_input,
    demo_off_by_config,
    demo_off_with_an_upstream,
);

async fn connect(server: &Server) -> (Ws, Value) {
    let (mut ws, _) = within(
        "websocket connect",
        tokio_tungstenite::connect_async(server.url("/ws/agent")),
    )
    .await
    .expect("websocket handshake");
    let hello = recv(&mut ws).await;
    assert_eq!(hello["type"], "connected", "{hello}");
    (ws, hello)
}

async fn send(ws: &mut Ws, v: Value) {
    within("send", ws.send(Message::text(v.to_string())))
        .await
        .expect("send");
}

async fn recv(ws: &mut Ws) -> Value {
    loop {
        match within("a message from ringgate", ws.next()).await {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(&t).unwrap_or_else(|e| panic!("{e}: {t}"))
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

async fn recv_until(ws: &mut Ws, ty: &str, id: &str) -> Vec<Value> {
    let mut got = Vec::new();
    loop {
        let m = recv(ws).await;
        let done = m["type"] == ty && m["id"] == id;
        got.push(m);
        if done {
            return got;
        }
    }
}

async fn demo_on_fresh_start(backend: Backend) {
    let server = Server::start(backend, &[]);
    let (mut ws, hello) = connect(&server).await;
    assert_eq!(hello["demo"], true, "{hello}");
    assert!(hello["message"].as_str().unwrap().contains("demo agent"));
    assert!(
        server.log().contains("built-in demo agent"),
        "{}",
        server.log()
    );

    send(
        &mut ws,
        json!({"type": "agent_query", "query": "hello", "id": "q1"}),
    )
    .await;
    let msgs = recv_until(&mut ws, "agent_response", "q1").await;
    assert_eq!(msgs[0]["type"], "status");
    let answer = msgs.last().unwrap();
    assert_eq!(answer["vendor"], "ringgate-demo");
    assert!(answer["content"].as_str().unwrap().contains("\"hello\""));

    send(
        &mut ws,
        json!({"type": "streaming_query", "query": "hello", "id": "s1"}),
    )
    .await;
    let msgs = recv_until(&mut ws, "stream_end", "s1").await;
    assert_eq!(msgs[0]["type"], "stream_start");
    let chunks: Vec<&str> = msgs
        .iter()
        .filter(|m| m["type"] == "stream_chunk")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert!(chunks.len() > 10, "word by word: {chunks:?}");
    assert_eq!(chunks.concat(), answer["content"].as_str().unwrap());

    send(
        &mut ws,
        json!({"type": "tool_call", "tool_name": "calculator",
               "params": {"expression": "123 + 456"}, "id": "t1"}),
    )
    .await;
    let r = recv_until(&mut ws, "tool_result", "t1").await;
    assert_eq!(r.last().unwrap()["result"], 579);
    send(
        &mut ws,
        json!({"type": "tool_call", "tool_name": "calculator",
               "params": {"expression": "(1 + 2) * 2 ^ 3 / 4"}, "id": "t2"}),
    )
    .await;
    let r = recv_until(&mut ws, "tool_result", "t2").await;
    assert_eq!(r.last().unwrap()["result"], 6);
}

async fn demo_cancel_stops_the_stream(backend: Backend) {
    let server = Server::start(backend, &[]);
    let (mut ws, _) = connect(&server).await;
    send(
        &mut ws,
        json!({"type": "streaming_query", "query": "x", "id": "s1"}),
    )
    .await;
    recv_until(&mut ws, "stream_chunk", "s1").await;
    send(&mut ws, json!({"type": "cancel", "id": "s1"})).await;
    recv_until(&mut ws, "cancelled", "s1").await;
    // Nothing more for s1: a ping's pong is the next message, after the words would have
    // kept coming.
    for i in 0..3 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let id = format!("p{i}");
        send(&mut ws, json!({"type": "ping", "id": id})).await;
        let m = recv(&mut ws).await;
        assert_eq!(m["type"], "pong", "after cancel: {m}");
    }
}

async fn demo_calculator_refuses_bad_input(backend: Backend) {
    let server = Server::start(backend, &[]);
    let (mut ws, _) = connect(&server).await;
    for (i, params) in [
        json!({"expression": "1 / 0"}),
        json!({"expression": "2 +"}),
        json!({"expression": "process.exit()"}),
        json!({"expression": 42}),
        json!({}),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("t{i}");
        send(
            &mut ws,
            json!({"type": "tool_call", "tool_name": "calculator", "params": params, "id": id}),
        )
        .await;
        let e = recv_until(&mut ws, "error", &id).await;
        let e = e.last().unwrap();
        assert_eq!(e["code"], "upstream_error", "{e}");
        assert!(
            e["error"].as_str().unwrap().starts_with("calculator:"),
            "{e}"
        );
    }
    send(
        &mut ws,
        json!({"type": "tool_call", "tool_name": "weather", "id": "w"}),
    )
    .await;
    let e = recv_until(&mut ws, "error", "w").await;
    assert!(e.last().unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("calculator"));
}

async fn demo_off_by_config(backend: Backend) {
    let server = Server::start_with_config(backend, "[agent]\ndemo = false\n", &[]);
    let (mut ws, hello) = connect(&server).await;
    assert_eq!(hello["message"], "Connected to Agent WebSocket");
    assert!(hello.get("demo").is_none());
    assert!(!server.log().contains("demo agent"));
    send(
        &mut ws,
        json!({"type": "agent_query", "query": "x", "id": "q"}),
    )
    .await;
    let e = recv_until(&mut ws, "error", "q").await;
    assert!(e.last().unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("no agent upstream is configured"));
}

async fn demo_off_with_an_upstream(backend: Backend) {
    // Nothing listens there: a connect error, not a demo answer.
    let server = Server::start(backend, &["--agent-upstream", "http://127.0.0.1:9"]);
    let (mut ws, hello) = connect(&server).await;
    assert!(hello.get("demo").is_none(), "{hello}");
    send(
        &mut ws,
        json!({"type": "agent_query", "query": "x", "id": "q"}),
    )
    .await;
    let e = recv_until(&mut ws, "error", "q").await;
    assert_eq!(e.last().unwrap()["code"], "upstream_error");
}
