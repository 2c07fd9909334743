//! `/metrics`: parsed with a Prometheus text-format parser; the key series move as traffic flows.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

both_backends!(
    a_fresh_node_exports_every_family,
    series_follow_traffic,
    statistics_match_open_connections,
    access_log_line_per_closed_connection,
    admin_listener_keeps_operations_off_the_public_port,
    metrics_can_be_turned_off
);

/// Scrapes and parses `/metrics`.
async fn scrape(server: &Server) -> prometheus_parse::Scrape {
    let resp = server.get("/metrics").await;
    assert_eq!(resp.status, 200);
    assert!(
        resp.header("content-type")
            .unwrap_or("")
            .starts_with("text/plain"),
        "content type"
    );
    let lines = resp.body.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format")
}

/// The value of `name` whose labels include all of `labels`, summed over the other labels.
fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|m| m.metric == name)
        .filter(|m| labels.iter().all(|(k, v)| m.labels.get(k) == Some(*v)))
        .map(|m| match m.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// Scrapes until `ok` holds (shards publish message counts once a second).
async fn eventually(server: &Server, ok: impl Fn(&prometheus_parse::Scrape) -> bool) {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let s = scrape(server).await;
        if ok(&s) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics never reached the expected values:\n{}",
            server.get("/metrics").await.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn series_follow_traffic(backend: Backend) {
    let server = Server::start(backend, &[]);
    let before = scrape(&server).await;
    assert_eq!(
        value(&before, "ringgate_info", &[("io", backend.log_name())]),
        1.0,
        "info gauge names the io backend"
    );
    assert_eq!(value(&before, "ringgate_messages_in_total", &[]), 0.0);

    let mut ws = server.ws().await;
    for i in 0..50 {
        echo(&mut ws, Message::text(format!("message {i}"))).await;
    }
    eventually(&server, |s| {
        value(s, "ringgate_connections_active", &[("endpoint", "echo")]) == 1.0
            && value(s, "ringgate_messages_in_total", &[("endpoint", "echo")]) >= 50.0
            && value(s, "ringgate_messages_out_total", &[("endpoint", "echo")]) >= 50.0
            && value(s, "ringgate_bytes_in_total", &[("endpoint", "echo")]) > 500.0
    })
    .await;

    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    })))
    .await
    .expect("close");
    let _ = expect_close(&mut ws).await;
    // A refused handshake and a 404 are counted too.
    let bad = server
        .request(
            "GET /ws/echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert_eq!(bad.status, 400);
    assert_eq!(server.get("/nope").await.status, 404);
    eventually(&server, |s| {
        value(s, "ringgate_connections_active", &[("endpoint", "echo")]) == 0.0
            && value(
                s,
                "ringgate_connections_closed_total",
                &[("endpoint", "echo"), ("code", "1000")],
            ) == 1.0
            && value(
                s,
                "ringgate_connections_opened_total",
                &[("endpoint", "echo")],
            ) == 1.0
            && value(
                s,
                "ringgate_handshakes_failed_total",
                &[("reason", "bad_request")],
            ) == 1.0
            && value(s, "ringgate_http_requests_total", &[("status", "404")]) == 1.0
    })
    .await;
}

async fn statistics(server: &Server) -> serde_json::Value {
    let resp = server.get("/ws/statistics").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    serde_json::from_str(&resp.body).expect("statistics are JSON")
}

async fn statistics_match_open_connections(backend: Backend) {
    let server = Server::start(backend, &[]);
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut ws = server.ws().await;
        for i in 0..3 {
            echo(&mut ws, Message::text(format!("m{i}"))).await;
        }
        clients.push(ws);
    }
    let s = statistics(&server).await;
    assert_eq!(s["active_connections"], 5, "{s}");
    assert_eq!(s["total_connections"], 5, "{s}");
    assert_eq!(s["total_messages"], 15, "{s}");
    let list = s["connections"].as_array().expect("connections list");
    assert_eq!(list.len(), 5, "{s}");
    for c in list {
        assert_eq!(c["endpoint"], "echo");
        assert_eq!(c["message_count"], 3);
        assert!(c["remote"].as_str().unwrap_or("").starts_with("127.0.0.1:"));
        assert!(c["uptime"].as_f64().unwrap_or(-1.0) >= 0.0);
        assert!(c["connected_at"].as_f64().unwrap_or(0.0) > 1.7e9);
    }
    assert!(s.get("truncated").is_none());

    // Closed connections leave the list but their messages still count.
    for mut ws in clients.drain(..2) {
        ws.send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        })))
        .await
        .expect("close");
        assert_eq!(expect_close(&mut ws).await, CloseCode::Normal);
    }
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let s = statistics(&server).await;
        if s["active_connections"] == 3 {
            assert_eq!(s["total_connections"], 5, "{s}");
            assert_eq!(s["total_messages"], 15, "{s}");
            assert_eq!(s["connections"].as_array().map(Vec::len), Some(3));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "closed connections still listed: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn access_log_line_per_closed_connection(backend: Backend) {
    let server = Server::start(backend, &[]);
    let mut ws = server.ws().await;
    echo(&mut ws, Message::text("hello")).await;
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Away,
        reason: "leaving".into(),
    })))
    .await
    .expect("close");
    assert_eq!(expect_close(&mut ws).await, CloseCode::Away);
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let log = server.log();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("access") && l.contains("websocket closed"))
        {
            for field in [
                "endpoint=\"echo\"",
                "close_code=1001",
                "messages_in=1",
                "remote=127.0.0.1:",
                "duration_ms=",
            ] {
                assert!(line.contains(field), "{field} missing in {line}");
            }
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no access log line:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn admin_listener_keeps_operations_off_the_public_port(backend: Backend) {
    let server = Server::start_with_config(backend, "admin_listen = \"127.0.0.1:0\"\n", &[]);
    let admin = server.admin_addr();
    assert_ne!(admin, server.addr);
    // Public: no metrics, no statistics; health and WebSockets as usual.
    assert_eq!(server.get("/metrics").await.status, 404);
    assert_eq!(server.get("/ws/statistics").await.status, 404);
    assert_eq!(server.get("/healthz").await.status, 200);
    let mut ws = server.ws().await;
    echo(&mut ws, Message::Text("still here".into())).await;
    // Admin: operations only.
    let get = |path: &'static str| {
        tokio::task::spawn_blocking(move || http_get_blocking(admin, path).expect("admin GET"))
    };
    let m = get("/metrics").await.unwrap();
    assert_eq!(m.status, 200);
    assert!(
        m.body.contains("ringgate_connections_opened_total"),
        "{}",
        m.body
    );
    let st = get("/ws/statistics").await.unwrap();
    assert_eq!(st.status, 200);
    let v: serde_json::Value = serde_json::from_str(&st.body).expect("JSON statistics");
    assert_eq!(v["active_connections"], 1);
    assert_eq!(get("/readyz").await.unwrap().status, 200);
    assert_eq!(get("/ws/echo").await.unwrap().status, 404);
    // The rooms API without a key is part of the admin surface.
    assert_eq!(get("/api/history?topic=x").await.unwrap().status, 200);
    assert_eq!(server.get("/api/history?topic=x").await.status, 404);
}

async fn metrics_can_be_turned_off(backend: Backend) {
    let server = Server::start_with_config(backend, "metrics = false\n", &[]);
    let resp = server.get("/metrics").await;
    assert_eq!(resp.status, 404);
    assert!(resp.body.contains("not enabled"), "{}", resp.body);
    let mut ws = server.ws().await;
    echo(&mut ws, Message::Text("works without metrics".into())).await;
}

/// Dashboards and `absent()` alerts work on a fresh node: every family is there, at zero.
async fn a_fresh_node_exports_every_family(backend: Backend) {
    // A route (to nowhere: nothing is sent through it) has its series before any request.
    // So does an agent upstream.
    let config = "[[route]]\nname = \"app\"\npath_prefix = \"/app/\"\nupstreams = [\"http://127.0.0.1:9\"]\n\
                  [agent]\nupstreams = [\"http://127.0.0.1:9\"]\n";
    let server = Server::start_with_config(backend, config, &[]);
    let body = server.get("/metrics").await.body;
    let missing: Vec<_> = ringgate::metrics::FROM_START
        .iter()
        .filter(|name| !body.contains(&format!("# TYPE {name} ")))
        .collect();
    assert!(missing.is_empty(), "missing {missing:?} in:\n{body}");
    for series in [
        "ringgate_fanout_size_count 0",
        "ringgate_proxy_requests_total{route=\"app\",class=\"2xx\"} 0",
        "ringgate_proxy_retries_total{route=\"app\"} 0",
        "ringgate_proxy_bytes_in_total{route=\"app\"} 0",
        "ringgate_proxy_websockets_active{route=\"app\"} 0",
        "ringgate_proxy_upstream_latency_seconds_count{route=\"app\"} 0",
        "ringgate_agent_upstream_requests_total{target=\"http://127.0.0.1:9",
        "ringgate_agent_upstream_timeouts_total{target=\"http://127.0.0.1:9",
        "ringgate_agent_upstream_latency_seconds_count{target=\"http://127.0.0.1:9",
        "ringgate_agent_breaker_state{target=\"http://127.0.0.1:9",
    ] {
        assert!(body.contains(series), "missing {series} in:\n{body}");
    }
}
