//! The rustls client for `wss://` targets.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, ensure, Context as _, Result};
use clap::Args;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_rustls::TlsConnector;

/// How `wss://` connections are made.
#[derive(Args, Clone)]
pub struct TlsArgs {
    /// wss://: PEM file with the CA certificate(s) to trust (`ringgate dev-cert DIR` writes
    /// DIR/ca.pem).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// wss://: accept any server certificate (handshake signatures are still verified).
    #[arg(long)]
    pub insecure: bool,
    /// wss://: resume TLS sessions from earlier connections (default: every handshake is full).
    #[arg(long)]
    pub tls_resume: bool,
}

impl TlsArgs {
    /// Whether any TLS option was given (they need a `wss://` URL).
    pub fn any(&self) -> bool {
        self.ca.is_some() || self.insecure || self.tls_resume
    }
}

/// The rustls client (ring provider, TLS 1.2 and 1.3, ALPN `http/1.1` like browsers).
pub fn connector(a: &TlsArgs) -> Result<TlsConnector> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut cfg = match (&a.ca, a.insecure) {
        (_, true) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth(),
        (Some(path), false) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("read {}", path.display()))?
            {
                let c = c.with_context(|| format!("{}: bad PEM", path.display()))?;
                roots
                    .add(c)
                    .with_context(|| format!("{}: unusable CA certificate", path.display()))?;
            }
            ensure!(
                !roots.is_empty(),
                "{}: no certificate found",
                path.display()
            );
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        (None, false) => bail!("wss:// needs --ca FILE (the CA to trust) or --insecure"),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !a.tls_resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    Ok(TlsConnector::from(Arc::new(cfg)))
}

/// `--insecure`: any certificate chain is accepted, but handshake signatures are verified as
/// usual, so the client's CPU work per handshake stays close to the verifying one.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
