//! TLS termination: wss/https with a certificate the client verifies, hot reload on SIGHUP,
//! and bad input on the TLS port, on both io backends.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

both_backends!(
    wss_echo_and_https,
    plaintext_to_tls_port_is_dropped,
    stalled_handshake_is_dropped,
    sighup_reloads_the_certificate,
    broken_certificate_keeps_the_old_one,
);

/// A directory with a fresh dev CA and certificate from `ringgate dev-cert`.
struct CertDir(PathBuf);

impl CertDir {
    async fn new() -> CertDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("certs-{}-{n}", std::process::id()));
        let out = run_to_exit(ringgate_command().arg("dev-cert").arg(&dir)).await;
        assert!(out.status.success(), "dev-cert failed: {out:?}");
        CertDir(dir)
    }
    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for CertDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tls_args(dir: &Path) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        dir.join("cert.pem").display().to_string(),
        "--tls-key".into(),
        dir.join("key.pem").display().to_string(),
    ]
}

fn start_tls(backend: Backend, dir: &Path, extra: &[&str]) -> Server {
    let args = tls_args(dir);
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend_from_slice(extra);
    Server::start(backend, &all)
}

/// A TLS connection to the server that trusts only `ca`.
async fn tls_connect(
    server: &Server,
    ca: &Path,
) -> std::io::Result<TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read CA") {
        roots.add(cert.expect("CA cert")).expect("add CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = server.tcp().await;
    let name = ServerName::try_from("localhost").expect("server name");
    within(
        "tls handshake",
        TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
}

async fn wss(server: &Server, ca: &Path) -> WebSocketStream<TlsStream<tokio::net::TcpStream>> {
    let tls = tls_connect(server, ca).await.expect("TLS handshake");
    let (ws, resp) = within(
        "wss upgrade",
        tokio_tungstenite::client_async("wss://localhost/ws/echo", tls),
    )
    .await
    .expect("wss upgrade");
    assert_eq!(resp.status(), 101);
    ws
}

async fn echo_ok<S>(ws: &mut WebSocketStream<S>, text: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::text(text)).await.expect("send");
    let got = within("echo", ws.next())
        .await
        .expect("stream open")
        .expect("message");
    assert_eq!(got, Message::text(text));
}

async fn wss_echo_and_https(backend: Backend) {
    let certs = CertDir::new().await;
    let server = start_tls(backend, &certs.0, &[]);
    let mut ws = wss(&server, &certs.file("ca.pem")).await;
    echo_ok(&mut ws, "over TLS").await;
    let big = vec![7u8; 300_000];
    ws.send(Message::binary(big.clone())).await.expect("send");
    let got = within("echo", ws.next())
        .await
        .expect("open")
        .expect("message");
    assert!(got.into_data()[..] == big[..], "binary echo differs");
    // Plain HTTP endpoints are served over TLS too.
    let mut tls = tls_connect(&server, &certs.file("ca.pem"))
        .await
        .expect("TLS");
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut resp = String::new();
    within("https response", tls.read_to_string(&mut resp))
        .await
        .ok();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

async fn plaintext_to_tls_port_is_dropped(backend: Backend) {
    let certs = CertDir::new().await;
    let server = start_tls(backend, &certs.0, &[]);
    let mut plain = server.tcp().await;
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    assert!(
        closed_within(&mut plain, PATIENCE).await,
        "plaintext connection left open"
    );
    // Others are unaffected.
    let mut ws = wss(&server, &certs.file("ca.pem")).await;
    echo_ok(&mut ws, "still fine").await;
}

async fn stalled_handshake_is_dropped(backend: Backend) {
    let certs = CertDir::new().await;
    let server = start_tls(backend, &certs.0, &["--handshake-timeout", "1"]);
    let mut silent = server.tcp().await;
    // Half a ClientHello record header, then nothing.
    silent.write_all(&[0x16, 0x03, 0x01]).await.expect("write");
    assert!(
        closed_within(&mut silent, PATIENCE).await,
        "stalled handshake left open"
    );
}

/// Copies the certificate and key from `from` over the files the server was started with.
fn install(from: &CertDir, to: &CertDir) {
    for f in ["cert.pem", "key.pem"] {
        std::fs::copy(from.file(f), to.file(f)).expect("copy cert");
    }
}

async fn wait_for_log(server: &Server, needle: &str) {
    within("log line", async {
        while !server.log().contains(needle) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

async fn sighup_reloads_the_certificate(backend: Backend) {
    let live = CertDir::new().await;
    let next = CertDir::new().await; // a different CA
    let server = start_tls(backend, &live.0, &[]);
    let old_ca = next.0.join("old-ca.pem");
    std::fs::copy(live.file("ca.pem"), &old_ca).expect("keep old CA");
    let mut established = wss(&server, &old_ca).await;

    install(&next, &live);
    server.signal(libc::SIGHUP);
    wait_for_log(&server, "TLS certificate reloaded").await;

    // New handshakes get the new certificate: the new CA verifies it, the old one does not.
    let mut fresh = wss(&server, &next.file("ca.pem")).await;
    echo_ok(&mut fresh, "new cert").await;
    assert!(
        tls_connect(&server, &old_ca).await.is_err(),
        "old CA still accepted after reload"
    );
    // The connection made before the reload stays up.
    echo_ok(&mut established, "old connection").await;
}

async fn broken_certificate_keeps_the_old_one(backend: Backend) {
    let live = CertDir::new().await;
    let server = start_tls(backend, &live.0, &[]);
    let ca = live.0.join("kept-ca.pem");
    std::fs::copy(live.file("ca.pem"), &ca).expect("keep CA");
    std::fs::write(live.file("cert.pem"), "not a certificate").expect("break cert");
    server.signal(libc::SIGHUP);
    wait_for_log(&server, "TLS reload failed").await;
    assert!(server.log().contains("cert.pem"), "reason names the file");
    let mut ws = wss(&server, &ca).await;
    echo_ok(&mut ws, "old cert still served").await;
}

#[tokio::test]
async fn bad_certificate_file_fails_at_start() {
    let out = run_to_exit(ringgate_command().args([
        "--port",
        "0",
        "--tls-cert",
        "/nonexistent/cert.pem",
        "--tls-key",
        "/nonexistent/key.pem",
    ]))
    .await;
    assert!(!out.status.success());
    let err = strip_ansi(&String::from_utf8_lossy(&out.stderr));
    assert!(err.contains("/nonexistent/cert.pem"), "{err}");
}
