//! Upstream servers the proxy tests start: a WebSocket application (tokio-tungstenite) and a
//! raw tunnel endpoint, shared by the HTTP/1.1 and the HTTP/2 (RFC 8441) tests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{
    Request as WsRequest, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use super::within;

pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

#[derive(Default)]
pub struct WsSeen {
    /// Close codes the upstream received.
    pub closes: Mutex<Vec<u16>>,
    pub paths: Mutex<Vec<String>>,
    /// 1 MiB messages the upstream got out for `flood:N`.
    pub flooded: AtomicUsize,
    /// `Sec-WebSocket-Extensions` offered to the upstream, per handshake.
    pub extensions: Mutex<Vec<Option<String>>>,
}

/// A tokio-tungstenite upstream: picks `superchat` when offered, echoes data messages; the
/// text `close:N` makes it close with code N; refuses `/forbidden` with 403.
#[allow(clippy::result_large_err)] // tungstenite's callback signature
pub async fn ws_upstream() -> (SocketAddr, Arc<WsSeen>) {
    ws_upstream_tls(None).await
}

#[allow(clippy::result_large_err)] // tungstenite's callback signature
pub async fn ws_upstream_tls(tls: Option<tokio_rustls::TlsAcceptor>) -> (SocketAddr, Arc<WsSeen>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(WsSeen::default());
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = l.accept().await {
            let seen = s2.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let sock: Box<dyn Io> = match tls {
                    None => Box::new(sock),
                    Some(a) => match a.accept(sock).await {
                        Ok(t) => Box::new(t),
                        Err(_) => return,
                    },
                };
                let cb = |req: &WsRequest, mut resp: WsResponse| {
                    seen.paths.lock().unwrap().push(req.uri().to_string());
                    seen.extensions.lock().unwrap().push(
                        req.headers()
                            .get("sec-websocket-extensions")
                            .map(|v| v.to_str().unwrap_or("?").to_string()),
                    );
                    if req.uri().path() == "/forbidden" {
                        let mut r = http::Response::new(Some("go away".to_string()));
                        *r.status_mut() = http::StatusCode::FORBIDDEN;
                        return Err(r);
                    }
                    let offered = req
                        .headers()
                        .get("sec-websocket-protocol")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    if offered.split(',').any(|p| p.trim() == "superchat") {
                        resp.headers_mut()
                            .insert("sec-websocket-protocol", "superchat".parse().unwrap());
                    }
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(sock, cb).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    match m {
                        // Gone without a close frame.
                        Message::Text(t) if t == "drop" => return,
                        Message::Text(t) if t.starts_with("flood:") => {
                            let n: usize = t[6..].parse().unwrap_or(0);
                            for _ in 0..n {
                                if ws.send(Message::binary(vec![1u8; 1 << 20])).await.is_err() {
                                    return;
                                }
                                seen.flooded.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        Message::Text(t) if t.starts_with("close:") => {
                            let code: u16 = t[6..].parse().unwrap_or(1000);
                            let _ = ws
                                .close(Some(CloseFrame {
                                    code: CloseCode::from(code),
                                    reason: "bye".into(),
                                }))
                                .await;
                        }
                        Message::Close(f) => {
                            seen.closes
                                .lock()
                                .unwrap()
                                .push(f.map_or(1005, |f| u16::from(f.code)));
                        }
                        m @ (Message::Text(_) | Message::Binary(_)) => {
                            let sent = ws.send(m).await;
                            if sent.is_err() {
                                return;
                            }
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// Waits until the upstream received a close with `code`.
pub async fn wait_close(seen: &WsSeen, code: u16) {
    within(&format!("upstream sees {code}"), async {
        while !seen.closes.lock().unwrap().contains(&code) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// A raw upstream for `mode = "tunnel"`: answers one upgrade with 101 (accepting its key) and
/// the bytes `early`, then echoes every byte until the client's half-close, and then says how
/// many came (`total N`). The bytes need not be WebSocket frames.
pub async fn tunnel_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let Ok((mut s, _)) = l.accept().await else {
            return;
        };
        let Some(head) = read_head(&mut s).await else {
            return;
        };
        let head = String::from_utf8_lossy(&head);
        let key = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(name, _)| name.eq_ignore_ascii_case("sec-websocket-key"))
            .map_or("", |(_, v)| v.trim());
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\nearly"
        );
        s.write_all(answer.as_bytes()).await.unwrap();
        // Echo everything until the client's half-close, then say how much came.
        let mut all = 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            all += n;
            s.write_all(&buf[..n]).await.unwrap();
        }
        s.write_all(format!("total {all}").as_bytes())
            .await
            .unwrap();
    });
    addr
}

/// A request or response head read byte by byte (nothing past it is consumed), or `None` when
/// the peer closed first.
pub async fn read_head(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.unwrap_or(0) == 0 {
            return None;
        }
        head.push(b[0]);
    }
    Some(head)
}
