//! Where the engine's results go: allocations (persisted) and L2Network
//! status, with the file-backed versions standalone mode uses.

use crate::crd::{L2Network, L2NetworkStatus};
use crate::ipam::Allocations;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

/// What a save resolves to: `Ok` once the values are durable.
pub type SaveFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'static>>;

/// Where allocations (VNIs, tunnel IPs, pod slices) and the active gateway
/// persist. The engine publishes nothing that depends on a value before
/// [`AllocStore::save`] has resolved `Ok` for it.
pub trait AllocStore: Send + Sync + std::fmt::Debug {
    fn load(&self) -> Result<Allocations, String>;
    /// The gateway that carried the remote tunnels, so that a restarted
    /// agent keeps it instead of re-electing (which would move the role).
    fn load_gateway(&self) -> Option<String> {
        None
    }
    /// Make `allocs` and `gateway` durable; the future resolves once they are.
    fn save(&self, allocs: &Allocations, gateway: Option<&str>) -> SaveFuture;
}

/// Allocations in a JSON file (standalone mode).
#[derive(Debug)]
pub struct FileAllocStore(pub PathBuf);

impl AllocStore for FileAllocStore {
    fn load(&self) -> Result<Allocations, String> {
        match std::fs::read_to_string(&self.0) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| format!("{} is corrupt: {e}", self.0.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Allocations::default()),
            Err(e) => Err(format!("{}: {e}", self.0.display())),
        }
    }
    fn load_gateway(&self) -> Option<String> {
        std::fs::read_to_string(self.0.with_file_name(GATEWAY_FILE))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    }
    fn save(&self, allocs: &Allocations, gateway: Option<&str>) -> SaveFuture {
        // Written before the future is returned: a local file write is quick,
        // and `write_private` renames into place, so a crash leaves the old
        // or the new file, never half of one.
        let path = self.0.with_file_name(GATEWAY_FILE);
        let dir = path.parent().unwrap_or_else(|| std::path::Path::new("."));
        let result = save_json(&self.0, allocs).and_then(|()| {
            crate::tls::write_private(dir, GATEWAY_FILE, gateway.unwrap_or_default(), 0o644)
                .map_err(|e| e.to_string())
        });
        Box::pin(std::future::ready(result))
    }
}

/// Next to the allocations: the active gateway's node name.
const GATEWAY_FILE: &str = "active-gateway";

/// Where the results of a reconcile go.
pub trait StatusSink: Send + Sync + std::fmt::Debug {
    /// Called with every network whose status changed, and with `None` for
    /// networks that no longer exist.
    fn write(&self, network: &L2Network, status: Option<&L2NetworkStatus>);
}

pub(crate) fn save_json(
    path: &std::path::Path,
    value: &impl serde::Serialize,
) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    let dir = path.parent().unwrap_or_else(|| std::path::Path::new("."));
    let name = path.file_name().map_or_else(
        || "allocations.json".to_owned(),
        |n| n.to_string_lossy().into_owned(),
    );
    crate::tls::write_private(dir, &name, &text, 0o644).map_err(|e| e.to_string())
}

/// Status files `<dir>/<namespace>.<name>.yaml` (standalone mode).
#[derive(Debug)]
pub struct FileStatusSink {
    pub dir: PathBuf,
}

impl StatusSink for FileStatusSink {
    fn write(&self, network: &L2Network, status: Option<&L2NetworkStatus>) {
        let ns = network.metadata.namespace.as_deref().unwrap_or("default");
        let name = network.metadata.name.as_deref().unwrap_or_default();
        let file = format!("{ns}.{name}.yaml");
        let result = match status {
            Some(st) => {
                let doc = serde_json::json!({
                    "apiVersion": "l2mesh.io/v1alpha1",
                    "kind": "L2Network",
                    "metadata": {"name": name, "namespace": ns},
                    "status": st,
                });
                serde_yaml::to_string(&doc)
                    .map_err(|e| e.to_string())
                    .and_then(|text| {
                        crate::tls::write_private(&self.dir, &file, &text, 0o644)
                            .map_err(|e| e.to_string())
                    })
            }
            None => match std::fs::remove_file(self.dir.join(&file)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
                _ => Ok(()),
            },
        };
        if let Err(e) = result {
            tracing::warn!(file, error = %e, "cannot write the L2Network status");
        }
    }
}
