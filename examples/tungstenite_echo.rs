//! Baseline for the benchmarks: a minimal tokio-tungstenite echo server, written the way a
//! typical Rust user would (current-thread tokio runtime, `accept_async`, read a message, send it
//! back). Nothing is tuned except TCP_NODELAY, which ringgate sets too.
//!
//!     cargo run --release --example tungstenite_echo -- --port 8004
//!
//! Listens on 127.0.0.1 only; any path is accepted.

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};

fn port_from_args() -> u16 {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--port") {
        Some(i) => args
            .get(i + 1)
            .and_then(|p| p.parse().ok())
            .expect("--port needs a number"),
        None => 8004,
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let port = port_from_args();
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    eprintln!("tungstenite echo listening on 127.0.0.1:{port}");
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(stream));
            }
            Err(e) => {
                // e.g. EMFILE: back off briefly instead of spinning.
                eprintln!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut ws = match tokio_tungstenite::accept_async(stream).await {
        Ok(ws) => ws,
        Err(_) => return,
    };
    while let Some(Ok(msg)) = ws.next().await {
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            break;
        }
    }
}
