//! The L2Network controller: finalizer, NAD, intent for the shared engine,
//! events; status patches come from the engine through [`K8sStatusSink`].

use super::nad::{MANAGER, NetworkAttachmentDefinition, nad_for};
use crate::crd::{L2Network, L2NetworkStatus};
use crate::engine::{Shared, StatusSink};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Client, Resource as _};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Finalizer that holds an L2Network until the nodes and the broker forgot it.
pub const FINALIZER: &str = "l2mesh.io/cleanup";

/// Controller errors (each reconcile is retried).
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
}

/// What reconcile needs.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    pub shared: Arc<Shared>,
    pub recorder: Recorder,
    /// Live L2Networks (not being deleted), the engine's intent.
    pub networks: Arc<Mutex<BTreeMap<String, L2Network>>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl Context {
    #[must_use]
    pub fn new(client: Client, shared: Arc<Shared>) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), MANAGER.into()),
            client,
            shared,
            networks: Arc::default(),
        }
    }

    fn publish_intent(&self, change: impl FnOnce(&mut BTreeMap<String, L2Network>)) -> bool {
        let mut map = self
            .networks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = map.len();
        change(&mut map);
        let added = map.len() > before;
        self.shared.set_networks(map.values().cloned().collect());
        added
    }

    async fn event(&self, net: &L2Network, type_: EventType, reason: &str, note: String) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        // Events are best effort: a failure must not fail the reconcile.
        if let Err(e) = self.recorder.publish(&ev, &net.object_ref(&())).await {
            tracing::debug!(error = %e, "event not recorded");
        }
    }
}

fn api<K>(client: &Client, net: &L2Network) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    Api::namespaced(
        client.clone(),
        net.metadata.namespace.as_deref().unwrap_or("default"),
    )
}

/// Reconcile one L2Network.
pub async fn reconcile(net: Arc<L2Network>, ctx: Arc<Context>) -> Result<Action, ControllerError> {
    let nets: Api<L2Network> = api(&ctx.client, &net);
    finalizer(&nets, FINALIZER, net, |event| async {
        match event {
            Finalizer::Apply(net) => apply(&net, &ctx).await,
            Finalizer::Cleanup(net) => cleanup(&net, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => ControllerError::Finalizer(other.to_string()),
    })
}

/// The range and MTU the NAD carries: those in effect once the agent has
/// resolved them (for multiCluster the broker's range, which the spec may
/// leave out), else the spec's. A status patch triggers a reconcile, so the
/// NAD follows the status.
fn nad_inputs(net: &L2Network) -> (Option<ipnet::IpNet>, u32) {
    let status = net.status.as_ref();
    let range = status
        .and_then(|s| s.ip_range.as_deref())
        .and_then(|r| r.parse().ok())
        .or_else(|| net.ip_range().ok().flatten());
    let mtu = status.and_then(|s| s.mtu).unwrap_or_else(|| net.mtu());
    (range, mtu)
}

async fn apply(net: &L2Network, ctx: &Context) -> Result<Action, ControllerError> {
    let key = net.key();
    if let Err(e) = net.validate() {
        ctx.event(net, EventType::Warning, "InvalidSpec", e.to_string())
            .await;
    } else {
        let nads: Api<NetworkAttachmentDefinition> = api(&ctx.client, net);
        let (range, mtu) = nad_inputs(net);
        let nad = nad_for(net, range, mtu);
        let name = net.metadata.name.clone().unwrap_or_default();
        nads.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&nad),
        )
        .await?;
    }
    let added = ctx.publish_intent(|m| {
        m.insert(key.clone(), net.clone());
    });
    if added {
        ctx.event(
            net,
            EventType::Normal,
            "Configured",
            format!("network {} handed to the nodes", net.dataplane_name()),
        )
        .await;
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

async fn cleanup(net: &L2Network, ctx: &Context) -> Result<Action, ControllerError> {
    let nads: Api<NetworkAttachmentDefinition> = api(&ctx.client, net);
    let name = net.metadata.name.clone().unwrap_or_default();
    match nads.delete(&name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    // Dropping it from the intent removes it from every node and from the
    // networks requested at the broker on the next reconcile of the engine.
    ctx.publish_intent(|m| {
        m.remove(&net.key());
    });
    ctx.event(
        net,
        EventType::Normal,
        "Deleted",
        format!("network {} removed from the nodes", net.dataplane_name()),
    )
    .await;
    Ok(Action::await_change())
}

/// On errors: log and retry with a delay.
pub fn error_policy(net: Arc<L2Network>, error: &ControllerError, _: Arc<Context>) -> Action {
    tracing::warn!(network = %net.key(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(10))
}

/// Patches L2Network status subresources from the engine's results.
#[derive(Debug)]
pub struct K8sStatusSink {
    tx: tokio::sync::mpsc::UnboundedSender<(L2Network, L2NetworkStatus)>,
}

impl K8sStatusSink {
    /// The sink and the task that does the patching (spawn it).
    pub fn new(client: Client) -> (Self, impl std::future::Future<Output = ()> + Send) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(L2Network, L2NetworkStatus)>();
        let recorder = Recorder::new(client.clone(), MANAGER.into());
        let task = async move {
            // Last Admitted status per network, to record its changes as events.
            let mut admitted: BTreeMap<String, String> = BTreeMap::new();
            while let Some((net, status)) = rx.recv().await {
                if let Err(e) = patch_status(&client, &net, &status).await {
                    tracing::warn!(network = %net.key(), error = %e, "status not patched");
                }
                if let Some(ev) = admission_event(&net, &status, &mut admitted)
                    && let Err(e) = recorder.publish(&ev, &net.object_ref(&())).await
                {
                    tracing::debug!(error = %e, "event not recorded");
                }
            }
        };
        (Self { tx }, task)
    }
}

/// An event when a multi-cluster network's admission changes.
fn admission_event(
    net: &L2Network,
    status: &L2NetworkStatus,
    last: &mut BTreeMap<String, String>,
) -> Option<Event> {
    if net.spec.scope != crate::crd::Scope::MultiCluster {
        return None;
    }
    let cond = status.conditions.iter().find(|c| c.type_ == "Admitted")?;
    if last.insert(net.key(), cond.status.clone()).as_deref() == Some(cond.status.as_str()) {
        return None;
    }
    let (type_, reason) = match cond.status.as_str() {
        "True" => (EventType::Normal, "Admitted"),
        "False" => (EventType::Warning, "NotAdmitted"),
        _ => return None,
    };
    Some(Event {
        type_,
        reason: reason.into(),
        note: Some(cond.message.clone()),
        action: "RequestNetwork".into(),
        secondary: None,
    })
}

impl StatusSink for K8sStatusSink {
    fn write(&self, network: &L2Network, status: Option<&L2NetworkStatus>) {
        // A deleted network has no status to patch.
        if let Some(status) = status {
            let _ = self.tx.send((network.clone(), status.clone()));
        }
    }
}

/// Merge-patch the status subresource.
pub async fn patch_status(
    client: &Client,
    net: &L2Network,
    status: &L2NetworkStatus,
) -> Result<(), kube::Error> {
    let nets: Api<L2Network> = api(client, net);
    let mut status = status.clone();
    status.observed_generation = net.metadata.generation;
    let patch = serde_json::json!({"status": status});
    nets.patch_status(
        net.metadata.name.as_deref().unwrap_or_default(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(yaml_spec: &str) -> L2Network {
        serde_yaml::from_str(&format!(
            "apiVersion: l2mesh.io/v1alpha1\nkind: L2Network\nmetadata: {{name: blue, namespace: team}}\nspec: {yaml_spec}\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_multi_cluster_nad_gets_the_brokers_range_and_mtu_once_resolved() {
        let mut n = net("{scope: multiCluster}");
        assert_eq!(nad_inputs(&n), (None, 1390), "nothing resolved yet");
        n.status = Some(L2NetworkStatus {
            ip_range: Some("10.200.0.0/16".into()),
            mtu: Some(1400),
            ..L2NetworkStatus::default()
        });
        let (range, mtu) = nad_inputs(&n);
        assert_eq!(
            range.map(|r| r.to_string()).as_deref(),
            Some("10.200.0.0/16")
        );
        assert_eq!(mtu, 1400);
        let conf = super::super::nad::cni_config(&n, range, mtu);
        assert_eq!(conf["ipam"]["subnet"], "10.200.0.0/16");
        assert_eq!(conf["mtu"], 1400);
    }

    #[test]
    fn a_local_nad_uses_the_spec_until_a_status_exists() {
        let n = net("{ipRange: 10.1.0.0/16, mtu: 1300}");
        let (range, mtu) = nad_inputs(&n);
        assert_eq!(range.map(|r| r.to_string()).as_deref(), Some("10.1.0.0/16"));
        assert_eq!(mtu, 1300);
    }
}
