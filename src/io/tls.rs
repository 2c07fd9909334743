//! TLS termination with rustls (ring provider): certificates from PEM files or generated for
//! development, and what a reload builds. The TLS streams themselves are [`super::Stream`].
//!
//! Reload is message passing, not a lock: the main thread builds a new `TlsAcceptor` and sends
//! it to every shard; handshakes started afterwards use it, established connections keep theirs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use std::collections::HashMap;
use tokio_rustls::TlsAcceptor;

pub use crate::error::TlsError;

/// Where the server certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    /// PEM files: the chain (leaf first) and its private key (PKCS#8, PKCS#1 or SEC1).
    Files { cert: PathBuf, key: PathBuf },
    /// A certificate for localhost generated in memory at start (development only).
    SelfSigned,
}

/// A development CA and a localhost certificate it signed, as PEM.
pub struct DevCert {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Generates a CA and a certificate for `localhost`, `127.0.0.1` and `::1` signed by it.
pub fn dev_cert() -> Result<DevCert, TlsError> {
    let gen = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "ringgate development CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().map_err(gen)?).map_err(gen)?;
    let key = KeyPair::generate().map_err(gen)?;
    let mut leaf = CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])
    .map_err(gen)?;
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    let cert = leaf.signed_by(&key, &ca).map_err(gen)?;
    Ok(DevCert {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Everything a TLS listener serves: certificates by server name, and client authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The certificate for clients that send no server name or one without its own entry;
    /// `None` refuses such clients.
    pub default: Option<CertSource>,
    /// Certificates chosen by the server name the client asks for (SNI).
    pub sni: Vec<(String, CertSource)>,
    /// Require client certificates signed by a CA in this PEM bundle (mTLS).
    pub client_ca: Option<PathBuf>,
}

/// Builds the acceptor (ALPN `h2` and `http/1.1`, TLS 1.2 and 1.3) from the files named in
/// `settings`.
pub fn acceptor(settings: &TlsSettings) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let load = |source: &CertSource| -> Result<Arc<CertifiedKey>, TlsError> {
        let (chain, key) = load_source(source)?;
        let signer = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let certified = CertifiedKey::new(chain, signer);
        certified
            .keys_match()
            .map_err(|e| TlsError::Config(format!("{source:?}: {e}")))?;
        Ok(Arc::new(certified))
    };
    let mut resolver = SniResolver {
        default: settings.default.as_ref().map(&load).transpose()?,
        by_name: HashMap::new(),
    };
    for (name, source) in &settings.sni {
        resolver
            .by_name
            .insert(name.to_ascii_lowercase(), load(source)?);
    }
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &settings.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_chain(ca)? {
                roots.add(cert).map_err(|e| file_error(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| file_error(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// One acceptor as a shard's listeners use it: with `h2` in ALPN, or (listeners with
/// `http2 = false`) the same certificates offering `http/1.1` only.
#[derive(Clone)]
pub struct Acceptors {
    with_h2: TlsAcceptor,
    http1: TlsAcceptor,
}

impl From<TlsAcceptor> for Acceptors {
    fn from(with_h2: TlsAcceptor) -> Acceptors {
        let mut config = (**with_h2.config()).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Acceptors {
            with_h2,
            http1: TlsAcceptor::from(Arc::new(config)),
        }
    }
}

impl Acceptors {
    pub fn get(&self, http2: bool) -> &TlsAcceptor {
        if http2 {
            &self.with_h2
        } else {
            &self.http1
        }
    }
}

fn load_source(
    source: &CertSource,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    match source {
        CertSource::Files { cert, key } => Ok((read_chain(cert)?, read_key(key)?)),
        CertSource::SelfSigned => {
            let d = dev_cert()?;
            let chain = CertificateDer::pem_slice_iter(d.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TlsError::Generate(e.to_string()))?;
            let key = PrivateKeyDer::from_pem_slice(d.key_pem.as_bytes())
                .map_err(|e| TlsError::Generate(e.to_string()))?;
            Ok((chain, key))
        }
    }
}

/// Picks the certificate by SNI name, falling back to the default (if any).
#[derive(Debug)]
struct SniResolver {
    default: Option<Arc<CertifiedKey>>,
    by_name: HashMap<String, Arc<CertifiedKey>>,
}

thread_local! {
    /// The server name of the ClientHello the resolver last saw on this thread.
    static SERVER_NAME: std::cell::Cell<Option<Box<str>>> = const { std::cell::Cell::new(None) };
}

/// The server name (SNI) of the ClientHello handled since the last call, if any. rustls'
/// unbuffered server connection does not tell the name it resolved; the resolver, which rustls
/// calls inside `process_tls_records` on the shard's thread, records it, and the TLS stream
/// clears it before and takes it after every call made while handshaking (so a name is only
/// ever read by the connection whose call recorded it).
pub(super) fn take_server_name() -> Option<Box<str>> {
    SERVER_NAME.with(|n| n.take())
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        SERVER_NAME.with(|n| n.set(hello.server_name().map(Box::from)));
        hello
            .server_name()
            .and_then(|n| self.by_name.get(&n.to_ascii_lowercase()))
            .or(self.default.as_ref())
            .cloned()
    }
}

fn file_error(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if chain.is_empty() {
        return Err(file_error(path, "no certificate found (expected PEM)"));
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, e))
}

/// Trust roots for connections to upstreams: the webpki roots plus the PEM certificates in
/// `ca_file`. A file or certificate that cannot be used is logged (naming `key`, the config key)
/// and skipped, so a bad extra CA never removes the public roots.
pub fn client_roots(ca_file: Option<&std::path::Path>, key: &str) -> Arc<rustls::RootCertStore> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        match rustls::pki_types::CertificateDer::pem_file_iter(path) {
            Ok(certs) => {
                for c in certs {
                    match c
                        .map_err(|e| e.to_string())
                        .and_then(|c| roots.add(c).map_err(|e| e.to_string()))
                    {
                        Ok(()) => {}
                        Err(e) => {
                            tracing::error!(file = %path.display(), error = %e, "{key}: certificate skipped")
                        }
                    }
                }
            }
            Err(e) => tracing::error!(file = %path.display(), error = %e, "{key}: cannot read"),
        }
    }
    Arc::new(roots)
}

/// A client configuration trusting `roots` and offering `alpn` (e.g. `h2`, `http/1.1`).
pub fn client_config(
    roots: &Arc<rustls::RootCertStore>,
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = match rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(b) => b
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
        // The ring provider supports the default versions; unreachable in practice.
        Err(_) => rustls::ClientConfig::builder()
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
    };
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_cert_builds_an_acceptor_from_files() {
        let d = dev_cert().unwrap();
        let dir = std::env::temp_dir().join(format!("ringgate-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, &d.cert_pem).unwrap();
        std::fs::write(&key, &d.key_pem).unwrap();
        let single = |source| TlsSettings {
            default: Some(source),
            sni: vec![],
            client_ca: None,
        };
        assert!(acceptor(&single(CertSource::Files {
            cert: cert.clone(),
            key: key.clone()
        }))
        .is_ok());
        // A key file that holds a certificate is named in the error.
        let err = acceptor(&single(CertSource::Files {
            cert: cert.clone(),
            key: cert.clone(),
        }))
        .err()
        .unwrap();
        assert!(err.to_string().contains("cert.pem"), "{err}");
        let err = acceptor(&single(CertSource::Files {
            cert: dir.join("missing.pem"),
            key,
        }))
        .err()
        .unwrap();
        assert!(err.to_string().contains("missing.pem"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn self_signed_works_in_memory() {
        let settings = TlsSettings {
            default: Some(CertSource::SelfSigned),
            sni: vec![],
            client_ca: None,
        };
        assert!(acceptor(&settings).is_ok());
    }
}
