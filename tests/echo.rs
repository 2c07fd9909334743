//! `/ws/echo`: messages come back as sent; protocol violations close with the right code.

mod common;

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

both_backends!(
    echo_text,
    echo_binary,
    echo_length_boundaries,
    echo_large,
    echo_pipelined,
    echo_fragmented,
    ping_pong,
    client_close_is_echoed,
    protocol_violations_close_1002,
    invalid_utf8_closes_1007,
    oversized_message_closes_1009,
);

async fn echo_text(backend: Backend) {
    let server = Server::start(backend, &[]);
    let mut ws = server.ws().await;
    echo(&mut ws, Message::text("hello")).await;
    echo(&mut ws, Message::text("héllo wörld €𝄞")).await;
    echo(&mut ws, Message::text("")).await;
}

async fn echo_binary(backend: Backend) {
    let server = Server::start(backend, &[]);
    let mut ws = server.ws().await;
    let every_byte: Vec<u8> = (0..=255).collect();
    echo(&mut ws, Message::binary(every_byte)).await;
    echo(&mut ws, Message::binary(Vec::new())).await;
}

/// Payload sizes around the 7-bit / 16-bit / 64-bit length encodings.
async fn echo_length_boundaries(backend: Backend) {
    let server = Server::start(backend, &[]);
    let mut ws = server.ws().await;
    for (i, len) in [125, 126, 127, 65535, 65536, 65537].into_iter().enumerate() {
        echo(&mut ws, Message::binary(pseudo_random(len, i as u64))).await;
    }
}

async fn echo_large(backend: Backend) {
    let server = Server::start(backend, &[]);
    let mut ws = server.ws().await;
    echo(&mut ws, Message::binary(pseudo_random(5 << 20, 42))).await;
    // The connection is still usable afterwards.
    echo(&mut ws, Message::text("after")).await;
}

/// Many messages in flight at once (more than the server's output high-water mark): all come
/// back, in order, while the client keeps sending.
async fn echo_pipelined(backend: Backend) {
    let server = Server::start(backend, &[]);
    let (mut tx, mut rx) = futures_util::StreamExt::split(server.ws().await);
    let msgs: Vec<Vec<u8>> = (0..200).map(|i| pseudo_random(32 * 1024, i)).collect();
    let expected = msgs.clone();
    let sender = tokio::spawn(async move {
        for m in msgs {
            tx.send(Message::binary(m)).await.expect("send");
        }
    });
    for (i, want) in expected.into_iter().enumerate() {
        match within("echo", futures_util::StreamExt::next(&mut rx)).await {
            Some(Ok(Message::Binary(got))) => assert!(got == want, "message {i} differs"),
            other => panic!("message {i}: {other:?}"),
        }
    }
    within("sender", sender).await.expect("sender task");
}

/// Fragments (with a ping in between) come back as one reassembled message.
async fn echo_fragmented(backend: Backend) {
    let server = Server::start(backend, &[]);
    let mut c = server.raw_ws().await;
    let mut bytes = frame(false, OP_TEXT, b"Hel");
    bytes.extend(frame(false, OP_CONT, b"lo, "));
    bytes.extend(frame(true, OP_PING, b"mid"));
    bytes.extend(frame(true, OP_CONT, "wörld".as_bytes()));
    c.send(&bytes).await;
    let pong = c.read_frame().await.expect("pong");
    assert_eq!((pong.opcode, &pong.payload[..]), (OP_PONG, &b"mid"[..]));
    let msg = c.read_frame().await.expect("echo");
    assert_eq!(
        msg,
        Frame {
            fin: true,
            rsv1: false,
            opcode: OP_TEXT,
            payload: "Hello, wörld".into()
        }
    );

    // Binary, one fragment per write so the server reassembles across reads.
    let data = pseudo_random(3000, 7);
    let chunks: Vec<&[u8]> = data.chunks(1000).collect();
    c.send(&frame(false, OP_BINARY, chunks[0])).await;
    c.send(&frame(false, OP_CONT, chunks[1])).await;
    c.send(&frame(true, OP_CONT, chunks[2])).await;
    let msg = c.read_frame().await.expect("echo");
    assert_eq!((msg.opcode, msg.fin), (OP_BINARY, true));
    assert_eq!(msg.payload, data);

    // A code point split across fragments is fine.
    let euro = "€".as_bytes();
    let mut bytes = frame(false, OP_TEXT, &euro[..1]);
    bytes.extend(frame(false, OP_CONT, &euro[1..2]));
    bytes.extend(frame(true, OP_CONT, &euro[2..]));
    c.send(&bytes).await;
    assert_eq!(c.read_frame().await.expect("echo").payload, euro);
}

async fn ping_pong(backend: Backend) {
    let server = Server::start(backend, &[]);
    let mut ws = server.ws().await;
    for payload in [&b"ping-payload"[..], b"", &[0xAB; 125]] {
        within("send ping", ws.send(Message::Ping(payload.to_vec())))
            .await
            .expect("send ping");
        match within("pong", futures_util::StreamExt::next(&mut ws)).await {
            Some(Ok(Message::Pong(p))) => assert_eq!(p, payload),
            other => panic!("expected a pong, got {other:?}"),
        }
    }
    // Raw: the pong is an unmasked, final control frame with the same payload.
    let mut c = server.raw_ws().await;
    c.send(&frame(true, OP_PING, b"raw")).await;
    let pong = c.read_frame().await.expect("pong");
    assert_eq!(
        pong,
        Frame {
            fin: true,
            rsv1: false,
            opcode: OP_PONG,
            payload: b"raw".to_vec()
        }
    );
}

async fn client_close_is_echoed(backend: Backend) {
    let server = Server::start(backend, &[]);
    let mut ws = server.ws().await;
    let close = CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    };
    within("send close", ws.close(Some(close)))
        .await
        .expect("close");
    assert_eq!(expect_close(&mut ws).await, CloseCode::Normal);

    // Raw: the code comes back, then the server ends the TCP connection.
    let mut c = server.raw_ws().await;
    c.send(&frame(true, OP_CLOSE, &close_body(1000, "done")))
        .await;
    c.expect_closed_with(1000).await;
    // An application code is echoed as well.
    let mut c = server.raw_ws().await;
    c.send(&frame(true, OP_CLOSE, &close_body(4000, ""))).await;
    c.expect_closed_with(4000).await;
}

async fn protocol_violations_close_1002(backend: Backend) {
    let server = Server::start(backend, &[]);
    let mut fragmented_then_new = frame(false, OP_TEXT, b"a");
    fragmented_then_new.extend(frame(true, OP_TEXT, b"b"));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unmasked frame", encode_frame(0x80 | OP_TEXT, None, b"hi")),
        (
            "RSV1 set",
            encode_frame(0x80 | 0x40 | OP_TEXT, Some([1, 2, 3, 4]), b"hi"),
        ),
        (
            "RSV3 set",
            encode_frame(0x80 | 0x10 | OP_BINARY, Some([1, 2, 3, 4]), b"hi"),
        ),
        ("continuation without start", frame(true, OP_CONT, b"x")),
        ("new message inside a fragmented one", fragmented_then_new),
        ("unknown opcode", frame(true, 0x3, b"x")),
        ("fragmented ping", frame(false, OP_PING, b"x")),
        ("ping over 125 bytes", frame(true, OP_PING, &[0; 126])),
        (
            "close code 1005 on the wire",
            frame(true, OP_CLOSE, &close_body(1005, "")),
        ),
        ("one-byte close body", frame(true, OP_CLOSE, &[3])),
    ];
    for (what, bytes) in cases {
        let mut c = server.raw_ws().await;
        c.send(&bytes).await;
        assert_eq!(c.expect_close().await, 1002, "{what}");
        c.expect_eof().await;
    }
}

async fn invalid_utf8_closes_1007(backend: Backend) {
    let server = Server::start(backend, &[]);
    let mut split_invalid = frame(false, OP_TEXT, &[b'o', b'k', 0xE2]); // starts "€"...
    split_invalid.extend(frame(true, OP_CONT, &[0x28, 0xA1])); // ...but does not continue it
    let mut truncated_at_end = frame(false, OP_TEXT, b"ok");
    truncated_at_end.extend(frame(true, OP_CONT, &[0xE2, 0x82]));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("single frame", frame(true, OP_TEXT, &[0xFF, 0xFE])),
        ("overlong encoding", frame(true, OP_TEXT, &[0xC0, 0xAF])),
        ("invalid across fragments", split_invalid),
        ("code point cut at the end", truncated_at_end),
        ("close reason", frame(true, OP_CLOSE, &[0x03, 0xE8, 0xFF])),
    ];
    for (what, bytes) in cases {
        let mut c = server.raw_ws().await;
        c.send(&bytes).await;
        assert_eq!(c.expect_close().await, 1007, "{what}");
        c.expect_eof().await;
    }
}

async fn oversized_message_closes_1009(backend: Backend) {
    let server = Server::start_with_config(backend, "max_message_size = 1000\n", &[]);
    // Exactly the limit is fine.
    let mut ws = server.ws().await;
    echo(&mut ws, Message::binary(vec![7u8; 1000])).await;

    let mut c = server.raw_ws().await;
    c.send(&frame(true, OP_BINARY, &[0u8; 1001])).await;
    c.expect_closed_with(1009).await;

    // The limit applies to the reassembled message, not each fragment.
    let mut c = server.raw_ws().await;
    c.send(&frame(false, OP_TEXT, &[b'a'; 600])).await;
    c.send(&frame(true, OP_CONT, &[b'b'; 600])).await;
    c.expect_closed_with(1009).await;

    // The tungstenite client sees the same code.
    let mut ws = server.ws().await;
    within("send", ws.send(Message::text("x".repeat(5000))))
        .await
        .expect("send");
    assert_eq!(expect_close(&mut ws).await, CloseCode::Size);
}
