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

async fn apply(net: &L2Network, ctx: &Context) -> Result<Action, ControllerError> {
    let key = net.key();
    if let Err(e) = net.validate() {
        ctx.event(net, EventType::Warning, "InvalidSpec", e.to_string())
            .await;
    } else {
        let nads: Api<NetworkAttachmentDefinition> = api(&ctx.client, net);
        let nad = nad_for(net, net.ip_range().ok().flatten(), net.mtu());
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
