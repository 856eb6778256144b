//! TLS for QUIC: the workspace's one crypto provider (ring), the server's
//! identity (generated or loaded), and the rustls configs of both ends.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// The ALPN protocol of deadbolt over QUIC, version 1.
pub const ALPN: &[u8] = b"deadbolt/1";

/// The names a generated certificate is valid for.
const SELF_SIGNED_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// What can go wrong setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A PEM file held nothing usable.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Generating a certificate failed.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// quinn refused the configuration.
    #[error("QUIC configuration: {0}")]
    Quic(String),
}

/// The workspace's crypto provider. Configs are built with it explicitly,
/// never from a process-wide default.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server's certificate chain and private key.
#[derive(Debug)]
pub struct Identity {
    /// The chain, leaf first.
    pub certs: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// A new self-signed ECDSA P-256 certificate (not Ed25519: browsers
    /// refuse Ed25519 certificates, and the WebSocket port serves `wss://`
    /// with this pair too) for `localhost`, `127.0.0.1`
    /// and `::1`; also its PEM text (certificate, key).
    pub fn self_signed() -> Result<(Identity, String, String), TlsError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let names: Vec<String> = SELF_SIGNED_NAMES.iter().map(|n| (*n).to_owned()).collect();
        let cert = rcgen::CertificateParams::new(names)?.self_signed(&key)?;
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        let identity = Identity {
            certs: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        };
        Ok((identity, cert_pem, key_pem))
    }

    /// Reads a chain and key from PEM text.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Identity, TlsError> {
        let pem_error = |reason: String| TlsError::Pem {
            path: PathBuf::from("<pem>"),
            reason,
        };
        let certs = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_error(e.to_string()))?;
        if certs.is_empty() {
            return Err(pem_error("no certificate".to_owned()));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| pem_error(e.to_string()))?;
        Ok(Identity { certs, key })
    }

    /// Loads a chain and key from PEM files.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Identity, TlsError> {
        let pem_error = |path: &Path, reason: String| TlsError::Pem {
            path: path.to_owned(),
            reason,
        };
        let certs = CertificateDer::pem_file_iter(cert_path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| pem_error(cert_path, e.to_string()))?;
        if certs.is_empty() {
            return Err(pem_error(
                cert_path,
                "no certificate in the file".to_owned(),
            ));
        }
        let key = PrivateKeyDer::from_pem_file(key_path)
            .map_err(|e| pem_error(key_path, e.to_string()))?;
        Ok(Identity { certs, key })
    }

    /// The identity in `dir` (`cert.pem`, `key.pem`), generated and written
    /// there first if it is not there yet. Returns it and the path of the
    /// certificate, which clients can trust with `--ca`.
    pub fn load_or_create(dir: &Path) -> Result<(Identity, PathBuf), TlsError> {
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        if cert_path.exists() && key_path.exists() {
            return Ok((Identity::load(&cert_path, &key_path)?, cert_path));
        }
        let file_error = |path: &Path| {
            let path = path.to_owned();
            move |source| TlsError::File { path, source }
        };
        std::fs::create_dir_all(dir).map_err(file_error(dir))?;
        let (identity, cert_pem, key_pem) = Identity::self_signed()?;
        write_private(&key_path, key_pem.as_bytes()).map_err(file_error(&key_path))?;
        std::fs::write(&cert_path, cert_pem).map_err(file_error(&cert_path))?;
        Ok((identity, cert_path))
    }
}

/// Writes a file only its owner may read.
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

/// The server's TLS configuration: TLS 1.3, ALPN `deadbolt/1`, no client
/// certificates.
pub fn server_crypto(identity: Identity) -> Result<Arc<QuicServerConfig>, TlsError> {
    let mut tls = server_tls(identity)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(Arc::new(quic))
}

/// A TLS 1.3 server configuration with `identity`, no client
/// certificates and no ALPN: QUIC's, before its ALPN is set, and the
/// WebSocket port's (`wss://`), which shares the certificate.
pub fn server_tls(identity: Identity) -> Result<rustls::ServerConfig, TlsError> {
    Ok(rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.certs, identity.key)?)
}

impl Identity {
    /// A second copy, for a second listener (QUIC and `wss://`).
    pub fn duplicate(&self) -> Identity {
        Identity {
            certs: self.certs.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// Which servers a client trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Certificates (or CAs) in a PEM file, such as the server's own
    /// generated `cert.pem`.
    CaFile(PathBuf),
    /// Certificates given as PEM text.
    CaPem(Vec<u8>),
    /// Any server at all. For development only: anyone on the path can
    /// pose as the server.
    Insecure,
}

/// The client's TLS configuration.
pub fn client_crypto(trust: &Trust) -> Result<Arc<QuicClientConfig>, TlsError> {
    let mut tls = client_tls(trust)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(Arc::new(quic))
}

/// A TLS 1.3 client configuration that trusts what `trust` says, without
/// ALPN: QUIC's, before its ALPN is set, and a `wss://` client's.
pub fn client_tls(trust: &Trust) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let tls = match trust {
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider())))
            .with_no_client_auth(),
        Trust::CaFile(path) => {
            let pem = std::fs::read(path).map_err(|source| TlsError::File {
                path: path.clone(),
                source,
            })?;
            builder
                .with_root_certificates(roots(&pem, path)?)
                .with_no_client_auth()
        }
        Trust::CaPem(pem) => builder
            .with_root_certificates(roots(pem, Path::new("<pem>"))?)
            .with_no_client_auth(),
    };
    Ok(tls)
}

/// A cluster node's TLS on its peer port: TLS 1.3 with `identity`, and
/// mutual: a peer must present a certificate that a certificate in
/// `cluster_ca` (PEM, read from `ca_path`) vouches for, or the handshake
/// fails. This is how etcd guards its peer port (`--peer-client-cert-auth`
/// with `--peer-trusted-ca-file`).
pub fn peer_server_tls(
    identity: Identity,
    cluster_ca: &[u8],
    ca_path: &Path,
) -> Result<rustls::ServerConfig, TlsError> {
    let roots = Arc::new(roots(cluster_ca, ca_path)?);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| rustls::Error::General(format!("peer certificate verifier: {e}")))?;
    Ok(rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.certs, identity.key)?)
}

/// A cluster node's TLS as a client of its peers' ports and of the
/// leader's `wss://` port (when it forwards): it trusts the servers that
/// `cluster_ca` vouches for, and presents `identity` when asked (the peer
/// port asks; the WebSocket port does not).
pub fn peer_client_tls(
    identity: Identity,
    cluster_ca: &[u8],
    ca_path: &Path,
) -> Result<rustls::ClientConfig, TlsError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(cluster_ca, ca_path)?)
        .with_client_auth_cert(identity.certs, identity.key)?)
}

fn roots(pem: &[u8], path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let pem_error = |reason: String| TlsError::Pem {
        path: path.to_owned(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        roots.add(cert.map_err(|e| pem_error(e.to_string()))?)?;
    }
    if roots.is_empty() {
        return Err(pem_error("no certificate in the file".to_owned()));
    }
    Ok(roots)
}

/// Accepts every server certificate, still checking that the handshake
/// signatures are valid for the certificate presented.
#[derive(Debug)]
struct AcceptAnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
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
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
