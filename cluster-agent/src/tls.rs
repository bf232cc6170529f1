//! TLS for the agent's two links.
//!
//! - To the broker: the server is trusted only if the CA it sends in its chain
//!   hashes to the pin from the join string and signs the server certificate
//!   for [`BROKER_SERVER_NAME`]. After joining, the agent also presents its
//!   cluster certificate (mTLS).
//! - To the nodes: the agent is its own small CA (made once, in the state
//!   dir) and serves NodeSync with a certificate for [`NODE_SYNC_SERVER_NAME`];
//!   nodes also send a bearer token from a file next to the CA.

use hyper_util::rt::TokioIo;
use l2mesh_proto::join::BROKER_SERVER_NAME;
use l2mesh_proto::pinned;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::transport::{Channel, Endpoint, Uri};

/// DNS name in the NodeSync server certificate; nodes verify it.
pub const NODE_SYNC_SERVER_NAME: &str = "l2mesh-agent";

/// TLS setup failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate or key: {0}")]
    Pem(String),
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("broker address {0:?} is not host:port")]
    BadAddress(String),
    /// Final: retrying cannot help.
    #[error(
        "the broker at {addr} presents a CA that does not match the pin in the join string: the join string is for another broker, or the broker's CA was re-created; get a fresh join string from the broker admin (`l2mesh-broker token create --cluster NAME`)"
    )]
    PinMismatch { addr: String },
    #[error("cannot connect to the broker at {addr}: {source}")]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
}

pub use l2mesh_proto::pinned::sha256;

/// Parse every certificate in a PEM text.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| TlsError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Pem("no certificate in PEM text".into()));
    }
    Ok(certs)
}

/// Client TLS for the broker: pinned CA, and the cluster identity if joined.
pub fn broker_client_config(
    pin: [u8; 32],
    identity: Option<(&str, &str)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let identity = match identity {
        Some((cert_pem, key_pem)) => {
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                .map_err(|e| TlsError::Pem(e.to_string()))?;
            Some((certs_from_pem(cert_pem)?, key))
        }
        None => None,
    };
    Ok(pinned::client_config(pin, identity)?)
}

/// A gRPC channel to the broker over our own TLS (tonic's built-in TLS cannot pin).
pub async fn broker_channel(addr: &str, tls: Arc<ClientConfig>) -> Result<Channel, TlsError> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| TlsError::BadAddress(addr.to_owned()))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .http2_keep_alive_interval(std::time::Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let connector = tokio_rustls::TlsConnector::from(tls);
    let target = addr.to_owned();
    // tonic's error keeps the TLS failure only as text: note it on the side.
    let mismatch = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = mismatch.clone();
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let target = target.clone();
            let seen = seen.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(&target).await?;
                let name = ServerName::try_from(BROKER_SERVER_NAME)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                let tls = connector.connect(name, tcp).await.inspect_err(|e| {
                    if pinned::is_pin_mismatch(e) {
                        seen.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                })?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|source| {
            if mismatch.load(std::sync::atomic::Ordering::Relaxed) {
                TlsError::PinMismatch {
                    addr: addr.to_owned(),
                }
            } else {
                TlsError::Connect {
                    addr: addr.to_owned(),
                    source,
                }
            }
        })
}

/// Files of the NodeSync PKI inside `<state-dir>/node-sync/`.
#[derive(Clone, Debug)]
pub struct NodeSyncPki {
    pub dir: PathBuf,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub token: String,
}

impl NodeSyncPki {
    pub const CA_FILE: &'static str = "ca.crt";
    pub const TOKEN_FILE: &'static str = "token";

    /// Load the PKI, creating it on first start.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, TlsError> {
        let dir = state_dir.join("node-sync");
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
        if let (Some(ca_pem), Some(cert_pem), Some(key_pem), Some(token)) = (
            read(Self::CA_FILE),
            read("server.crt"),
            read("server.key"),
            read(Self::TOKEN_FILE),
        ) {
            return Ok(Self {
                dir,
                ca_pem,
                cert_pem,
                key_pem,
                token: token.trim().to_owned(),
            });
        }
        let pki = Self::generate(dir.clone())?;
        write_private(&dir, Self::CA_FILE, &pki.ca_pem, 0o644)?;
        write_private(&dir, "server.crt", &pki.cert_pem, 0o644)?;
        write_private(&dir, "server.key", &pki.key_pem, 0o600)?;
        write_private(&dir, Self::TOKEN_FILE, &pki.token, 0o600)?;
        Ok(pki)
    }

    /// A new CA, server certificate and token (nothing is written).
    pub fn generate(dir: PathBuf) -> Result<Self, TlsError> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "l2mesh-agent node-sync CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![NODE_SYNC_SERVER_NAME.to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, NODE_SYNC_SERVER_NAME);
        let cert = params.signed_by(&key, &ca)?;
        let token = random_token();
        Ok(Self {
            dir,
            ca_pem: ca.pem(),
            // The chain lets clients that only trust the CA build the path.
            cert_pem: format!("{}{}", cert.pem(), ca.pem()),
            key_pem: key.serialize_pem(),
            token,
        })
    }

    /// tonic server TLS for NodeSync.
    #[must_use]
    pub fn server_tls(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
            &self.cert_pem,
            &self.key_pem,
        ))
    }
}

/// 32 random bytes as base64url: bearer tokens.
#[must_use]
pub fn random_token() -> String {
    use base64::Engine as _;
    use rand::RngCore as _;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Write a file atomically (temp + rename) with `mode`, creating `dir`.
pub fn write_private(dir: &Path, name: &str, content: &str, mode: u32) -> Result<(), TlsError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |path: &Path, source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io(&tmp, e))?;
    f.write_all(content.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_sync_pki_is_created_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = NodeSyncPki::load_or_create(dir.path()).unwrap();
        let b = NodeSyncPki::load_or_create(dir.path()).unwrap();
        assert_eq!(a.token, b.token);
        assert_eq!(a.ca_pem, b.ca_pem);
        assert_eq!(certs_from_pem(&a.cert_pem).unwrap().len(), 2);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("node-sync/server.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(a.token.len() >= 40);
    }

    #[test]
    fn broker_config_builds_with_and_without_identity() {
        broker_client_config([0; 32], None).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["x".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        broker_client_config([0; 32], Some((&cert.pem(), &key.serialize_pem()))).unwrap();
        assert!(certs_from_pem("nothing").is_err());
    }
}
