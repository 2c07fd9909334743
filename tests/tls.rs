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
    key_types_and_versions_with_openssl,
    unknown_names_are_refused_without_a_default,
    sni_picks_the_certificate,
    client_certificates_are_required_with_client_ca,
    plain_and_tls_listeners_at_once,
    wss_echo_and_https,
    plaintext_to_tls_port_is_dropped,
    stalled_handshake_is_dropped,
    sighup_reloads_the_certificate,
    broken_certificate_keeps_the_old_one,
);

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
    tls_connect_to(server.addr, "localhost", ca, None).await
}

/// A TLS connection to `addr` asking for `sni`, trusting only `ca`, optionally presenting a
/// client certificate (PEM chain and key files).
async fn tls_connect_to(
    addr: std::net::SocketAddr,
    sni: &str,
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> std::io::Result<TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read CA") {
        roots.add(cert.expect("CA cert")).expect("add CA");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .expect("client cert")
                .collect::<Result<Vec<_>, _>>()
                .expect("client cert");
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).expect("client key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client auth")
        }
    };
    let tcp = within("tcp connect", tokio::net::TcpStream::connect(addr))
        .await
        .expect("tcp connect");
    let name = ServerName::try_from(sni.to_string()).expect("server name");
    within(
        "tls handshake",
        TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
}

/// A CA of our own (rcgen) that issues certificates into a directory.
struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let issuer =
            rcgen::CertifiedIssuer::self_signed(p, rcgen::KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    /// Writes `<stem>.pem`, `<stem>.key` for `names` and `<stem>-ca.pem` into `dir`.
    fn issue(&self, dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        let paths = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
            dir.join(format!("{stem}-ca.pem")),
        );
        std::fs::write(&paths.0, cert.pem()).unwrap();
        std::fs::write(&paths.1, key.serialize_pem()).unwrap();
        std::fs::write(&paths.2, self.issuer.pem()).unwrap();
        paths
    }
}

async fn wss_on(
    addr: std::net::SocketAddr,
    tls: TlsStream<tokio::net::TcpStream>,
) -> WebSocketStream<TlsStream<tokio::net::TcpStream>> {
    let (ws, resp) = within(
        "wss upgrade",
        tokio_tungstenite::client_async(format!("wss://localhost:{}/ws/echo", addr.port()), tls),
    )
    .await
    .expect("wss upgrade");
    assert_eq!(resp.status(), 101);
    ws
}

async fn sni_picks_the_certificate(backend: Backend) {
    let certs = CertDir::new().await; // default: localhost, dev CA
    let (api_cert, api_key, api_ca) = Ca::new("api CA").issue(&certs.0, "api", &["api.test"]);
    let config = format!(
        "[tls]\ncert = {:?}\nkey = {:?}\n[[tls.sni]]\nserver_name = \"api.test\"\ncert = {:?}\nkey = {:?}\n",
        certs.file("cert.pem"),
        certs.file("key.pem"),
        api_cert,
        api_key
    );
    let server = Server::start_with_config(backend, &config, &[]);
    let dev_ca = certs.file("ca.pem");
    // The name decides the certificate: each verifies only against its own CA.
    assert!(tls_connect_to(server.addr, "api.test", &api_ca, None)
        .await
        .is_ok());
    assert!(tls_connect_to(server.addr, "API.test", &api_ca, None)
        .await
        .is_ok());
    assert!(tls_connect_to(server.addr, "api.test", &dev_ca, None)
        .await
        .is_err());
    assert!(tls_connect_to(server.addr, "localhost", &dev_ca, None)
        .await
        .is_ok());
    // Unknown names get the default certificate (which then fails the client's name check).
    assert!(tls_connect_to(server.addr, "other.test", &api_ca, None)
        .await
        .is_err());
    let mut ws = wss(&server, &dev_ca).await;
    echo_ok(&mut ws, "default certificate").await;
}

async fn client_certificates_are_required_with_client_ca(backend: Backend) {
    let certs = CertDir::new().await;
    let (client_cert, client_key, client_ca) =
        Ca::new("client CA").issue(&certs.0, "client", &["client-1"]);
    let (rogue_cert, rogue_key, _) = Ca::new("rogue CA").issue(&certs.0, "rogue", &["client-2"]);
    let config = format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
        certs.file("cert.pem"),
        certs.file("key.pem"),
        client_ca
    );
    let server = Server::start_with_config(backend, &config, &[]);
    let ca = certs.file("ca.pem");
    let good = tls_connect_to(
        server.addr,
        "localhost",
        &ca,
        Some((&client_cert, &client_key)),
    )
    .await
    .expect("client certificate accepted");
    let mut ws = wss_on(server.addr, good).await;
    echo_ok(&mut ws, "mutual TLS").await;
    // Without a certificate, or with one from another CA, nothing gets through. (In TLS 1.3
    // the client may finish its side first; the refusal then surfaces on the first read.)
    for client in [None, Some((rogue_cert.as_path(), rogue_key.as_path()))] {
        if let Ok(tls) = tls_connect_to(server.addr, "localhost", &ca, client).await {
            let upgrade = within(
                "refused upgrade",
                tokio_tungstenite::client_async("wss://localhost/ws/echo", tls),
            )
            .await;
            assert!(
                upgrade.is_err(),
                "served without a valid client certificate"
            );
        }
    }
}

async fn plain_and_tls_listeners_at_once(backend: Backend) {
    let certs = CertDir::new().await;
    let config = format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[listen]]\naddr = \"127.0.0.1:0\"\ntls = true\n[tls]\ncert = {:?}\nkey = {:?}\n",
        certs.file("cert.pem"),
        certs.file("key.pem"),
    );
    let server = Server::start_with_config(backend, &config, &[]);
    // The first listener is plain: the harness's plain client works on it.
    let mut plain = server.ws().await;
    echo(&mut plain, Message::text("plain")).await;
    // The second one, from the log, is TLS.
    let log = server.log();
    let line = log
        .lines()
        .find(|l| l.contains("also listening"))
        .expect("second listener logged");
    let addr: std::net::SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .and_then(|a| a.parse().ok())
        .expect("second listener address");
    let tls = tls_connect_to(addr, "localhost", &certs.file("ca.pem"), None)
        .await
        .expect("TLS on the second listener");
    let mut ws = wss_on(addr, tls).await;
    echo_ok(&mut ws, "tls").await;
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

/// `GET path` over TLS; the whole response as text.
async fn https_get(server: &Server, ca: &Path, path: &str) -> String {
    let mut tls = tls_connect(server, ca).await.expect("TLS");
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.expect("write");
    let mut resp = String::new();
    within("https response", tls.read_to_string(&mut resp))
        .await
        .ok();
    resp
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
    // The failure is counted, and so are the handshakes.
    let metrics = https_get(&server, &ca, "/metrics").await;
    assert!(
        metrics.contains("ringgate_tls_reloads_total{result=\"error\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ringgate_tls_handshakes_total{result=\"ok\"}"),
        "{metrics}"
    );
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

/// Runs a shell command line (openssl) and returns its output; panics when it cannot start.
async fn sh(script: &str) -> std::process::Output {
    let script = script.to_string();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            .args(["-c", &script])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run sh")
    })
    .await
    .expect("join")
}

/// RSA (PKCS#1), ECDSA (SEC1) and Ed25519 (PKCS#8) keys made by OpenSSL all serve, and OpenSSL's
/// own client completes TLS 1.2 and 1.3 handshakes against them (a second TLS implementation).
async fn key_types_and_versions_with_openssl(backend: Backend) {
    let certs = CertDir::new().await;
    let dir = certs.0.display().to_string();
    for (name, genkey, expect) in [
        (
            "rsa",
            "openssl genrsa -traditional -out rsa.key 2048",
            "BEGIN RSA PRIVATE KEY",
        ),
        (
            "ec",
            "openssl ecparam -name prime256v1 -genkey -noout -out ec.key",
            "BEGIN EC PRIVATE KEY",
        ),
        (
            "ed25519",
            "openssl genpkey -algorithm ed25519 -out ed25519.key",
            "BEGIN PRIVATE KEY",
        ),
    ] {
        let make = format!(
            "cd {dir} && {genkey} 2>/dev/null && openssl req -x509 -new -key {name}.key \
             -subj /CN=localhost -addext subjectAltName=DNS:localhost -days 2 \
             -out {name}.pem 2>/dev/null"
        );
        let out = sh(&make).await;
        assert!(out.status.success(), "{name}: openssl failed: {out:?}");
        let key = std::fs::read_to_string(certs.file(&format!("{name}.key"))).expect("key");
        assert!(
            key.contains(expect),
            "{name}: key is not in the expected format"
        );
        let server = Server::start(
            backend,
            &[
                "--tls-cert",
                &certs.file(&format!("{name}.pem")).display().to_string(),
                "--tls-key",
                &certs.file(&format!("{name}.key")).display().to_string(),
            ],
        );
        for version in ["-tls1_2", "-tls1_3"] {
            // Ed25519 certificates are TLS 1.3 only in OpenSSL's client defaults as well.
            if name == "ed25519" && version == "-tls1_2" {
                continue;
            }
            let out = sh(&format!(
                "echo 'GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' | \
                 timeout 10 openssl s_client -connect {} -servername localhost {version} \
                 -alpn http/1.1 -ign_eof 2>&1",
                server.addr
            ))
            .await;
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains("HTTP/1.1 200"),
                "{name} {version}: no HTTP answer over TLS:\n{text}"
            );
            assert!(
                text.contains("ALPN protocol: http/1.1"),
                "{name} {version}: {text}"
            );
            let proto = if version == "-tls1_2" {
                "TLSv1.2"
            } else {
                "TLSv1.3"
            };
            assert!(text.contains(proto), "{name} {version}: {text}");
        }
    }
}

async fn unknown_names_are_refused_without_a_default(backend: Backend) {
    let certs = CertDir::new().await;
    let (api_cert, api_key, api_ca) = Ca::new("api CA").issue(&certs.0, "api", &["api.test"]);
    let config = format!(
        "[tls]\n[[tls.sni]]\nserver_name = \"api.test\"\ncert = {api_cert:?}\nkey = {api_key:?}\n"
    );
    let server = Server::start_with_config(backend, &config, &[]);
    assert!(tls_connect_to(server.addr, "api.test", &api_ca, None)
        .await
        .is_ok());
    assert!(tls_connect_to(server.addr, "other.test", &api_ca, None)
        .await
        .is_err());
    // The refused handshake touched nobody else.
    let tls = tls_connect_to(server.addr, "api.test", &api_ca, None)
        .await
        .expect("TLS");
    let mut ws = wss_on(server.addr, tls).await;
    echo_ok(&mut ws, "still serving").await;
}
