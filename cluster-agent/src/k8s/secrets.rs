//! What the agent keeps in Secrets of its namespace (Kubernetes mode):
//! - `l2mesh-agent-identity`: `identity.json` (cluster certificate and key),
//!   `allocations.json`, and the NodeSync server certificate and key;
//! - `l2mesh-node-sync`: `ca.crt` and `token`, which the dataplane DaemonSet mounts.

use crate::engine::AllocStore;
use crate::identity::Identity;
use crate::ipam::Allocations;
use crate::tls::NodeSyncPki;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use std::collections::BTreeMap;

pub const IDENTITY_SECRET: &str = "l2mesh-agent-identity";
pub const NODE_SYNC_SECRET: &str = "l2mesh-node-sync";

/// Secret storage errors.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("Secret {secret} key {key} is corrupt ({detail}): delete the key to start over")]
    Corrupt {
        secret: &'static str,
        key: &'static str,
        detail: String,
    },
}

/// The string values of a Secret, `None` if it does not exist.
pub async fn read(
    api: &Api<Secret>,
    name: &str,
) -> Result<Option<BTreeMap<String, String>>, kube::Error> {
    Ok(api.get_opt(name).await?.map(|s| {
        s.data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
            .collect()
    }))
}

/// Set keys of a Secret (creating it), keeping the other keys.
pub async fn write(
    api: &Api<Secret>,
    name: &str,
    values: &BTreeMap<String, String>,
) -> Result<(), kube::Error> {
    let data = |m: &BTreeMap<String, String>| -> BTreeMap<String, ByteString> {
        m.iter()
            .map(|(k, v)| (k.clone(), ByteString(v.as_bytes().to_vec())))
            .collect()
    };
    match api.get_opt(name).await? {
        Some(mut secret) => {
            let mut merged = secret.data.take().unwrap_or_default();
            merged.extend(data(values));
            secret.data = Some(merged);
            api.replace(name, &PostParams::default(), &secret)
                .await
                .map(drop)
        }
        None => {
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    labels: Some(
                        [(
                            "app.kubernetes.io/managed-by".to_owned(),
                            "l2mesh-agent".to_owned(),
                        )]
                        .into(),
                    ),
                    ..ObjectMeta::default()
                },
                type_: Some("Opaque".into()),
                data: Some(data(values)),
                ..Secret::default()
            };
            api.create(&PostParams::default(), &secret).await.map(drop)
        }
    }
}

pub async fn load_identity(api: &Api<Secret>) -> Result<Option<Identity>, SecretError> {
    let Some(data) = read(api, IDENTITY_SECRET).await? else {
        return Ok(None);
    };
    let Some(text) = data.get("identity.json") else {
        return Ok(None);
    };
    serde_json::from_str(text)
        .map(Some)
        .map_err(|e| SecretError::Corrupt {
            secret: IDENTITY_SECRET,
            key: "identity.json",
            detail: e.to_string(),
        })
}

pub async fn store_identity(api: &Api<Secret>, id: &Identity) -> Result<(), SecretError> {
    let text = serde_json::to_string(id).map_err(|e| SecretError::Corrupt {
        secret: IDENTITY_SECRET,
        key: "identity.json",
        detail: e.to_string(),
    })?;
    write(
        api,
        IDENTITY_SECRET,
        &[("identity.json".to_owned(), text)].into(),
    )
    .await?;
    Ok(())
}

/// The NodeSync PKI, created on first start: the server key stays in the
/// identity Secret, what nodes need goes to the node-sync Secret.
pub async fn load_or_create_pki(api: &Api<Secret>) -> Result<NodeSyncPki, SecretError> {
    let id = read(api, IDENTITY_SECRET).await?.unwrap_or_default();
    let nodes = read(api, NODE_SYNC_SECRET).await?.unwrap_or_default();
    if let (Some(cert), Some(key), Some(ca), Some(token)) = (
        id.get("node-sync-server.crt"),
        id.get("node-sync-server.key"),
        nodes.get("ca.crt"),
        nodes.get("token"),
    ) {
        return Ok(NodeSyncPki {
            dir: std::path::PathBuf::from(format!("secret/{NODE_SYNC_SECRET}")),
            ca_pem: ca.clone(),
            cert_pem: cert.clone(),
            key_pem: key.clone(),
            token: token.clone(),
        });
    }
    let pki = NodeSyncPki::generate(format!("secret/{NODE_SYNC_SECRET}").into()).map_err(|e| {
        SecretError::Corrupt {
            secret: NODE_SYNC_SECRET,
            key: "ca.crt",
            detail: e.to_string(),
        }
    })?;
    write(
        api,
        IDENTITY_SECRET,
        &[
            ("node-sync-server.crt".to_owned(), pki.cert_pem.clone()),
            ("node-sync-server.key".to_owned(), pki.key_pem.clone()),
        ]
        .into(),
    )
    .await?;
    write(
        api,
        NODE_SYNC_SECRET,
        &[
            ("ca.crt".to_owned(), pki.ca_pem.clone()),
            ("token".to_owned(), pki.token.clone()),
        ]
        .into(),
    )
    .await?;
    Ok(pki)
}

/// Allocations (and the active gateway) in the identity Secret. A save is
/// one read-modify-replace of the Secret carrying its resourceVersion, so a
/// concurrent writer (another replica that took the lease) makes it fail
/// instead of being overwritten.
#[derive(Clone)]
pub struct SecretAllocStore {
    api: Api<Secret>,
    initial: Allocations,
    gateway: Option<String>,
}

impl std::fmt::Debug for SecretAllocStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretAllocStore").finish_non_exhaustive()
    }
}

const ALLOCATIONS_KEY: &str = "allocations.json";
const GATEWAY_KEY: &str = "active-gateway";

impl SecretAllocStore {
    /// Load what the Secret holds now.
    pub async fn new(api: Api<Secret>) -> Result<Self, SecretError> {
        let data = read(&api, IDENTITY_SECRET).await?.unwrap_or_default();
        let initial = match data.get(ALLOCATIONS_KEY) {
            Some(text) => serde_json::from_str(text).map_err(|e| SecretError::Corrupt {
                secret: IDENTITY_SECRET,
                key: ALLOCATIONS_KEY,
                detail: e.to_string(),
            })?,
            None => Allocations::default(),
        };
        let gateway = data
            .get(GATEWAY_KEY)
            .map(|g| g.trim().to_owned())
            .filter(|g| !g.is_empty());
        Ok(Self {
            api,
            initial,
            gateway,
        })
    }
}

impl AllocStore for SecretAllocStore {
    fn load(&self) -> Result<Allocations, String> {
        Ok(self.initial.clone())
    }
    fn load_gateway(&self) -> Option<String> {
        self.gateway.clone()
    }
    fn save(&self, allocs: &Allocations, gateway: Option<&str>) -> crate::engine::SaveFuture {
        let api = self.api.clone();
        let text = serde_json::to_string(allocs);
        let gateway = gateway.unwrap_or_default().to_owned();
        Box::pin(async move {
            let text = text.map_err(|e| e.to_string())?;
            let values: BTreeMap<String, String> = [
                (ALLOCATIONS_KEY.to_owned(), text),
                (GATEWAY_KEY.to_owned(), gateway),
            ]
            .into();
            write(&api, IDENTITY_SECRET, &values)
                .await
                .map_err(|e| format!("Secret {IDENTITY_SECRET}: {e}"))
        })
    }
}
