//! A small client for the broker: TLS with the CA pinned by the join string,
//! joining with a CSR, then mTLS with the issued certificate. Used by the
//! admin CLI, the tests and the benchmark; the cluster agent may reuse it.

use crate::error::{Error, Result};
use crate::pki::AdminCredential;
use crate::state::sha256;
use hyper_util::rt::TokioIo;
use l2mesh_proto::broker as pb;
use l2mesh_proto::broker::broker_admin_client::BrokerAdminClient;
use l2mesh_proto::broker::broker_client::BrokerClient;
use l2mesh_proto::join::{BROKER_SERVER_NAME, JoinString};
use l2mesh_proto::pinned;
use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// A rustls client config pinned to `ca_sha256`, with an optional client
/// certificate.
pub fn tls_config(
    ca_sha256: [u8; 32],
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<ClientConfig>> {
    pinned::client_config(ca_sha256, identity)
        .map_err(|e| Error::Transport(format!("TLS client configuration: {e}")))
}

/// Connect to the first reachable of `addrs` (`host:port`).
pub async fn connect(addrs: &[String], config: Arc<ClientConfig>) -> Result<Channel> {
    let mut last = Error::Transport("no broker address given".into());
    for addr in addrs {
        match connect_one(addr, Arc::clone(&config)).await {
            Ok(ch) => return Ok(ch),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn connect_one(addr: &str, config: Arc<ClientConfig>) -> Result<Channel> {
    let target = addr.to_owned();
    let connector = tower::service_fn(move |_: Uri| {
        let target = target.clone();
        let config = Arc::clone(&config);
        async move {
            let tcp = TcpStream::connect(&target).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(BROKER_SERVER_NAME)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            // tonic keeps only the text of a connector error: give a pin
            // mismatch a text that says what is wrong.
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| {
                    if pinned::is_pin_mismatch(&e) {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, pinned::PinMismatch)
                    } else {
                        e
                    }
                })?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Error::InvalidArgument(format!("broker address {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .connect_with_connector(connector)
        .await
        .map_err(|e| {
            let msg = l2mesh_telemetry::error_chain(&e);
            Error::Transport(format!("cannot reach the broker at {addr}: {msg}"))
        })
}

/// What a successful join gives a cluster. Keep `key_pem` private.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct ClusterCredential {
    pub cluster: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    pub tunnel_subnet: String,
    pub brokers: Vec<String>,
}

impl std::fmt::Debug for ClusterCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCredential")
            .field("cluster", &self.cluster)
            .field("tunnel_subnet", &self.tunnel_subnet)
            .field("brokers", &self.brokers)
            .finish_non_exhaustive()
    }
}

/// A fresh key and a CSR for it (PEM key, PEM CSR).
pub fn make_csr() -> Result<(String, String)> {
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)?
        .pem()?;
    Ok((key.serialize_pem(), csr))
}

/// Join the broker named in `join` with a fresh key.
pub async fn join(join: &JoinString) -> Result<ClusterCredential> {
    let pin = join
        .ca_pin_sha256()
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let (key_pem, csr_pem) = make_csr()?;
    let channel = connect(&join.brokers, tls_config(pin, None)?).await?;
    let resp = BrokerClient::new(channel)
        .join(pb::JoinRequest {
            token_id: join.id.clone(),
            token_secret: join.secret.clone(),
            cluster_name: join.cluster.clone(),
            csr_pem,
        })
        .await?
        .into_inner();
    let ca = CertificateDer::from_pem_slice(resp.ca_cert_pem.as_bytes())
        .map_err(|e| Error::Pki(format!("broker sent a bad CA: {e}")))?;
    if sha256(&ca) != pin {
        return Err(Error::Pki(
            "the CA in the join response does not match the pin".into(),
        ));
    }
    Ok(ClusterCredential {
        cluster: resp.cluster_name,
        cert_pem: resp.client_cert_pem,
        key_pem,
        ca_pem: resp.ca_cert_pem,
        tunnel_subnet: resp.tunnel_subnet,
        brokers: join.brokers.clone(),
    })
}

impl ClusterCredential {
    /// Save as JSON, readable only by the owner (it holds the private key).
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Pki(format!("cannot encode the credential: {e}")))?;
        crate::pki::write_private(path, &json)
    }

    /// Load what [`ClusterCredential::save`] wrote.
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        serde_json::from_str(&text).map_err(|e| {
            Error::InvalidArgument(format!(
                "{} is not a saved cluster credential ({e}): join again with a new token",
                path.display()
            ))
        })
    }

    /// mTLS rustls config for this cluster.
    pub fn tls_config(&self) -> Result<Arc<ClientConfig>> {
        let ca = CertificateDer::from_pem_slice(self.ca_pem.as_bytes())
            .map_err(|e| Error::Pki(format!("CA: {e}")))?;
        let cert = CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| Error::Pki(format!("client certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| Error::Pki(format!("client key: {e}")))?;
        tls_config(sha256(&ca), Some((vec![cert], key)))
    }

    /// When this credential's certificate expires (Unix seconds).
    pub fn not_after_unix(&self) -> Result<i64> {
        let cert = CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| Error::Pki(format!("client certificate: {e}")))?;
        crate::pki::not_after_unix(&cert)
            .ok_or_else(|| Error::Pki("the client certificate has no readable validity".into()))
    }

    /// Whether the certificate is past two thirds of its life at `now`:
    /// time to [`renew`](Self::renew) it.
    pub fn due_for_renewal(&self, now: i64) -> Result<bool> {
        let cert = CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| Error::Pki(format!("client certificate: {e}")))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| Error::Pki(format!("client certificate: {e}")))?;
        let start = parsed.validity().not_before.timestamp();
        let end = parsed.validity().not_after.timestamp();
        Ok(now >= start + (end - start) / 3 * 2)
    }

    /// A new certificate (for a new key) from the broker, asked for with
    /// the current one: no token needed. The current one keeps working
    /// until it expires.
    pub async fn renew(&self) -> Result<Self> {
        let (key_pem, csr_pem) = make_csr()?;
        let resp = self
            .connect()
            .await?
            .renew_certificate(pb::RenewRequest { csr_pem })
            .await?
            .into_inner();
        Ok(Self {
            cert_pem: resp.client_cert_pem,
            key_pem,
            ..self.clone()
        })
    }

    /// An mTLS client for the `Broker` service.
    pub async fn connect(&self) -> Result<BrokerClient<Channel>> {
        Ok(
            BrokerClient::new(connect(&self.brokers, self.tls_config()?).await?)
                .max_decoding_message_size(l2mesh_proto::limits::MAX_MESSAGE_BYTES),
        )
    }
}

/// An mTLS client for the `BrokerAdmin` service.
pub async fn admin_client(
    addrs: &[String],
    cred: &AdminCredential,
) -> Result<BrokerAdminClient<Channel>> {
    let identity = (
        vec![CertificateDer::from(cred.cert.clone())],
        cred.key.clone_key(),
    );
    let config = tls_config(sha256(&cred.ca), Some(identity))?;
    Ok(BrokerAdminClient::new(connect(addrs, config).await?)
        .max_decoding_message_size(l2mesh_proto::limits::MAX_MESSAGE_BYTES))
}
