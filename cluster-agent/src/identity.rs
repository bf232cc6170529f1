//! Onboarding: join the broker once with the join string, keep the identity.
//!
//! The private key is generated here and never leaves the state dir; the
//! broker only sees the CSR. After a successful join the identity file is
//! written before anything else happens, so a restart never needs the token
//! again (tokens are single-use).

use crate::tls::{self, TlsError};
use l2mesh_proto::broker::JoinRequest;
use l2mesh_proto::broker::broker_client::BrokerClient;
use l2mesh_proto::join::{JoinString, JoinStringError};
use rcgen::{CertificateParams, DnType, KeyPair};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;
use std::time::Duration;

const IDENTITY_FILE: &str = "identity.json";

/// What the agent is at the broker. `Debug` hides the key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub cluster: String,
    pub brokers: Vec<String>,
    /// `sha256:<hex>` of the broker CA.
    pub ca_pin: String,
    pub tunnel_subnet: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("cluster", &self.cluster)
            .field("brokers", &self.brokers)
            .field("ca_pin", &self.ca_pin)
            .field("tunnel_subnet", &self.tunnel_subnet)
            .finish_non_exhaustive()
    }
}

/// Why joining failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    JoinString(#[from] JoinStringError),
    /// The broker said no: retrying with the same token cannot help. Made
    /// with [`JoinError::rejected`], which gives the advice once.
    #[error("the broker rejected the join: {0}")]
    Rejected(String),
    /// The broker is not the one the join string pins: final.
    #[error("{0}")]
    PinMismatch(String),
    /// No broker answered: worth retrying.
    #[error("no broker could be reached ({0}); will retry")]
    Unreachable(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot store the identity: {0}")]
    Store(String),
    #[error(
        "no identity in {0} and no join string: pass --join-string or --join-string-file (or L2MESH_JOIN_STRING) for the first start, or --tunnel-subnet to run without a broker"
    )]
    NoJoinString(String),
}

/// What to do after a rejected join.
const REJOIN_ADVICE: &str =
    "ask the broker admin for a new join string (`l2mesh-broker token create --cluster NAME`)";

impl JoinError {
    /// A rejection with the broker's words, and the advice unless the
    /// broker already gave it.
    #[must_use]
    pub fn rejected(broker_says: &str) -> Self {
        let advised = ["new join string", "new token"]
            .iter()
            .any(|w| broker_says.contains(w));
        if advised {
            Self::Rejected(broker_says.to_owned())
        } else {
            Self::Rejected(format!("{broker_says}: {REJOIN_ADVICE}"))
        }
    }

    /// Whether trying again later may succeed.
    #[must_use]
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Unreachable(_))
    }
}

impl Identity {
    /// The stored identity, if any.
    pub fn load(state_dir: &Path) -> Result<Option<Self>, JoinError> {
        let path = state_dir.join(IDENTITY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| JoinError::Store(format!("{} is corrupt: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(JoinError::Store(format!("{}: {e}", path.display()))),
        }
    }

    pub fn save(&self, state_dir: &Path) -> Result<(), JoinError> {
        let text =
            serde_json::to_string_pretty(self).map_err(|e| JoinError::Store(e.to_string()))?;
        tls::write_private(state_dir, IDENTITY_FILE, &text, 0o600)
            .map_err(|e| JoinError::Store(e.to_string()))
    }

    pub fn pin(&self) -> Result<[u8; 32], JoinError> {
        let js = JoinString {
            brokers: vec![],
            ca: self.ca_pin.clone(),
            id: String::new(),
            secret: String::new(),
            cluster: String::new(),
        };
        Ok(js.ca_pin_sha256()?)
    }
}

/// Whether the broker's answer to a join may change on a later try: a
/// verdict on the token or the request is final; overload, rate limits and
/// broker-side trouble are not.
fn retryable_status(s: &tonic::Status) -> bool {
    !matches!(
        s.code(),
        tonic::Code::Unauthenticated
            | tonic::Code::PermissionDenied
            | tonic::Code::InvalidArgument
            | tonic::Code::NotFound
            | tonic::Code::AlreadyExists
            | tonic::Code::FailedPrecondition
            | tonic::Code::OutOfRange
            | tonic::Code::Unimplemented
    )
}

/// One join attempt against each broker address in turn.
/// A fresh key pair and a CSR for it (PEM).
fn key_and_csr(cluster: &str) -> Result<(KeyPair, String), TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, cluster.to_owned());
    let csr_pem = params.serialize_request(&key)?.pem()?;
    Ok((key, csr_pem))
}

impl Identity {
    /// When to renew the certificate (Unix seconds): two thirds into its
    /// validity. `None` if the certificate cannot be read.
    #[must_use]
    pub fn renew_after_unix(&self) -> Option<i64> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(self.cert_pem.as_bytes()).ok()?;
        let cert = pem.parse_x509().ok()?;
        let validity = cert.validity();
        let (start, end) = (
            validity.not_before.timestamp(),
            validity.not_after.timestamp(),
        );
        Some(start + (end - start).max(0) / 3 * 2)
    }

    /// A new certificate for a new key, asked for with the current one (no
    /// token). The current certificate stays valid until it expires.
    pub async fn renew(
        &self,
        client: &mut BrokerClient<tonic::transport::Channel>,
    ) -> Result<Self, String> {
        let (key, csr_pem) = key_and_csr(&self.cluster).map_err(|e| e.to_string())?;
        let resp = client
            .renew_certificate(l2mesh_proto::broker::RenewRequest { csr_pem })
            .await
            .map_err(|s| format!("renew certificate: {}", s.message()))?
            .into_inner();
        Ok(Self {
            cert_pem: resp.client_cert_pem,
            key_pem: key.serialize_pem(),
            ..self.clone()
        })
    }
}

pub async fn join_once(js: &JoinString) -> Result<Identity, JoinError> {
    let pin = js.ca_pin_sha256()?;
    let (key, csr_pem) = key_and_csr(&js.cluster)?;
    let config = tls::broker_client_config(pin, None)?;
    let mut last_error = String::from("no broker address");
    let mut mismatch = None;
    for addr in js.brokers.iter().filter(|b| !b.trim().is_empty()) {
        let channel = match tls::broker_channel(addr, config.clone()).await {
            Ok(c) => c,
            Err(e @ TlsError::PinMismatch { .. }) => {
                mismatch = Some(e.to_string());
                continue;
            }
            Err(e) => {
                last_error = l2mesh_telemetry::error_chain(&e);
                continue;
            }
        };
        let request = JoinRequest {
            token_id: js.id.clone(),
            token_secret: js.secret.clone(),
            cluster_name: js.cluster.clone(),
            csr_pem: csr_pem.clone(),
        };
        match BrokerClient::new(channel).join(request).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                let ca = tls::certs_from_pem(&resp.ca_cert_pem)?;
                if ca.iter().all(|c| tls::sha256(c.as_ref()) != pin) {
                    return Err(JoinError::rejected(
                        "the broker returned a CA that does not match the pin",
                    ));
                }
                if resp.tunnel_subnet.parse::<ipnet::Ipv4Net>().is_err() {
                    return Err(JoinError::rejected(&format!(
                        "the broker gave an invalid tunnel subnet {:?}",
                        resp.tunnel_subnet
                    )));
                }
                return Ok(Identity {
                    cluster: resp.cluster_name,
                    brokers: js.brokers.clone(),
                    ca_pin: js.ca.clone(),
                    tunnel_subnet: resp.tunnel_subnet,
                    cert_pem: resp.client_cert_pem,
                    key_pem: key.serialize_pem(),
                    ca_pem: resp.ca_cert_pem,
                });
            }
            Err(s) if retryable_status(&s) => last_error = format!("{addr}: {}", s.message()),
            Err(s) => return Err(JoinError::rejected(s.message())),
        }
    }
    // One address with the wrong CA is enough: the pin is the same for all,
    // so the join string does not belong to this broker.
    Err(mismatch.map_or(JoinError::Unreachable(last_error), JoinError::PinMismatch))
}

/// Exponential backoff from 1 s to 30 s.
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: Duration::from_secs(1),
        }
    }
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(30));
        d
    }
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

/// The stored identity, or join now (retrying while no broker answers).
pub async fn onboard(state_dir: &Path, js: Option<&JoinString>) -> Result<Identity, JoinError> {
    if let Some(id) = Identity::load(state_dir)? {
        if let Some(js) = js
            && js.cluster != id.cluster
        {
            tracing::warn!(
                stored = %id.cluster,
                join_string = %js.cluster,
                "the state dir already holds an identity for another cluster; using it and ignoring the join string"
            );
        }
        tracing::info!(cluster = %id.cluster, "using the stored identity");
        return Ok(id);
    }
    let js = js.ok_or_else(|| JoinError::NoJoinString(state_dir.display().to_string()))?;
    let mut backoff = Backoff::default();
    loop {
        match join_once(js).await {
            Ok(id) => {
                id.save(state_dir)?;
                tracing::info!(cluster = %id.cluster, tunnel_subnet = %id.tunnel_subnet, "joined the broker");
                return Ok(id);
            }
            Err(e) if e.retryable() => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, ?delay, "join failed");
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rejection_gives_the_advice_once() {
        let broker_advised = JoinError::rejected(
            "token \"t\" has no uses left: ask the broker admin for a new join string",
        )
        .to_string();
        assert_eq!(
            broker_advised.matches("ask the broker admin").count(),
            1,
            "{broker_advised}"
        );
        let bare = JoinError::rejected("permission denied").to_string();
        assert_eq!(bare.matches("ask the broker admin").count(), 1, "{bare}");
        assert!(bare.contains("permission denied"));
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let mut b = Backoff::default();
        let d: Vec<u64> = (0..7).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(d, vec![1, 2, 4, 8, 16, 30, 30]);
        b.reset();
        assert_eq!(b.next_delay().as_secs(), 1);
    }

    #[test]
    fn identity_round_trips_and_hides_the_key() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Identity::load(dir.path()).unwrap().is_none());
        let id = Identity {
            cluster: "edge".into(),
            brokers: vec!["127.0.0.1:1".into()],
            ca_pin: JoinString::format_pin(&[1; 32]),
            tunnel_subnet: "100.64.1.0/24".into(),
            cert_pem: "cert".into(),
            key_pem: "SECRET-KEY".into(),
            ca_pem: "ca".into(),
        };
        id.save(dir.path()).unwrap();
        assert_eq!(Identity::load(dir.path()).unwrap(), Some(id.clone()));
        assert!(!format!("{id:?}").contains("SECRET"));
        assert_eq!(id.pin().unwrap(), [1; 32]);
    }

    #[tokio::test]
    async fn no_identity_and_no_join_string_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = onboard(dir.path(), None).await.unwrap_err();
        assert!(e.to_string().contains("--join-string"), "{e}");
        assert!(!e.retryable());
    }
}
