//! The L2Network controller: finalizer and NAD per network. The engine's
//! intent comes from its own reflectors (see `k8s::mirror`); status patches
//! and the events that follow status changes come from the engine through
//! [`K8sStatusSink`].

use super::nad::{MANAGER, NetworkAttachmentDefinition, nad_for};
use crate::crd::{Condition, L2Network, L2NetworkStatus};
use crate::engine::{Shared, StatusSink};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Client, Resource as _};
use std::collections::BTreeMap;
use std::sync::Arc;
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
    #[error("the network is not removed from the nodes yet; the finalizer stays until it is")]
    StillOnNodes,
}

/// What reconcile needs.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    pub shared: Arc<Shared>,
    pub recorder: Recorder,
    /// The NADs as a reflector sees them: a NAD that already is what it
    /// should be is not written again. A status write triggers a
    /// reconcile (the NAD follows `status.ipRange` and `status.mtu`), and
    /// that reconcile writes nothing unless the NAD must change.
    pub nads: Option<kube::runtime::reflector::Store<NetworkAttachmentDefinition>>,
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
            nads: None,
        }
    }

    /// Skip NAD writes that would change nothing, as `store` sees the NADs.
    #[must_use]
    pub fn with_nad_store(
        mut self,
        store: kube::runtime::reflector::Store<NetworkAttachmentDefinition>,
    ) -> Self {
        self.nads = Some(store);
        self
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

/// Until the engine has the complete L2Network list, nothing is written.
const WAIT_FOR_LIST: Duration = Duration::from_secs(1);
/// How long a deletion waits in line for the engine to drop the network.
const CLEANUP_WAIT: Duration = Duration::from_secs(5);
/// Without the NAD CRD the NAD is tried again this often.
const NAD_CRD_RETRY: Duration = Duration::from_secs(60);

/// What to tell the operator when the Multus NAD CRD is not installed.
pub const NAD_CRD_MISSING: &str = "the NetworkAttachmentDefinition CRD (network-attachment-definitions.k8s.cni.cncf.io) is not installed, so pods cannot attach to this network: install Multus (its deployment adds the CRD); the nodes keep being served meanwhile";

/// Whether the network may have a NAD: a valid spec, and its name on the
/// nodes is its own (an older L2Network with the same name keeps it).
fn may_attach(net: &L2Network, networks: &[L2Network]) -> bool {
    net.validate().is_ok()
        && crate::desired::node_name_owners(networks).get(&net.dataplane_name()) == Some(&net.key())
}

#[tracing::instrument(skip_all, fields(network = %net.key()))]
async fn apply(net: &L2Network, ctx: &Context) -> Result<Action, ControllerError> {
    let Some(mut networks) = ctx.shared.networks() else {
        return Ok(Action::requeue(WAIT_FOR_LIST));
    };
    // The engine's list may not have this (new) network yet.
    if !networks.iter().any(|n| n.key() == net.key()) {
        networks.push(net.clone());
    }
    let nads: Api<NetworkAttachmentDefinition> = api(&ctx.client, net);
    let name = net.metadata.name.clone().unwrap_or_default();
    if !may_attach(net, &networks) {
        // No usable NAD: a pod attached through it would land on another
        // network's bridge (or on none). The status says why.
        return match nads.delete(&name, &DeleteParams::default()).await {
            Ok(_) => Ok(Action::requeue(Duration::from_secs(300))),
            Err(kube::Error::Api(s)) if s.code == 404 => {
                Ok(Action::requeue(Duration::from_secs(300)))
            }
            Err(e) => Err(e.into()),
        };
    }
    let (range, mtu) = nad_inputs(net);
    let nad = nad_for(net, range, mtu);
    let existing = ctx.nads.as_ref().and_then(|store| {
        store.get(
            &kube::runtime::reflector::ObjectRef::new(&name)
                .within(net.metadata.namespace.as_deref().unwrap_or("default")),
        )
    });
    if existing.is_some_and(|e| super::nad::up_to_date(&e, &nad)) {
        ctx.shared.set_nad_missing(None);
        return Ok(Action::requeue(Duration::from_secs(300)));
    }
    match nads
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&nad),
        )
        .await
    {
        Ok(_) => {
            ctx.shared.set_nad_missing(None);
            Ok(Action::requeue(Duration::from_secs(300)))
        }
        Err(kube::Error::Api(s)) if s.code == 404 => {
            if ctx.shared.nad_missing().is_none() {
                tracing::warn!("{NAD_CRD_MISSING}");
            }
            ctx.shared.set_nad_missing(Some(NAD_CRD_MISSING.to_owned()));
            Ok(Action::requeue(NAD_CRD_RETRY))
        }
        Err(e) => Err(e.into()),
    }
}

#[tracing::instrument(skip_all, fields(network = %net.key()))]
async fn cleanup(net: &L2Network, ctx: &Context) -> Result<Action, ControllerError> {
    // The engine drops a network being deleted from the nodes and the
    // broker request; the finalizer goes only once it has.
    let deadline = tokio::time::Instant::now() + CLEANUP_WAIT;
    while ctx.shared.status_of(&net.key()).is_some() {
        if tokio::time::Instant::now() > deadline {
            return Err(ControllerError::StillOnNodes);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let nads: Api<NetworkAttachmentDefinition> = api(&ctx.client, net);
    let name = net.metadata.name.clone().unwrap_or_default();
    match nads.delete(&name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    ctx.event(
        net,
        EventType::Normal,
        "Deleted",
        format!("network {} removed from the nodes", net.dataplane_name()),
    )
    .await;
    Ok(Action::await_change())
}

/// On errors: log and retry with a delay. A deletion that waits for the
/// engine is no failure: it is checked again soon, quietly.
pub fn error_policy(net: Arc<L2Network>, error: &ControllerError, _: Arc<Context>) -> Action {
    if matches!(error, ControllerError::StillOnNodes) {
        tracing::debug!(network = %net.key(), %error, "deletion waits");
        return Action::requeue(WAIT_FOR_LIST);
    }
    tracing::warn!(network = %net.key(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(10))
}

/// Patches L2Network status subresources from the engine's results, and
/// records an event when a condition changes.
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
            // The conditions last written per network; before the first
            // write, those the object carries (so a restart repeats nothing).
            let mut last: BTreeMap<String, Vec<Condition>> = BTreeMap::new();
            while let Some((net, status)) = rx.recv().await {
                if let Err(e) = patch_status(&client, &net, &status).await {
                    tracing::warn!(network = %net.key(), error = %e, "status not patched");
                    continue;
                }
                let before = last.remove(&net.key()).unwrap_or_else(|| {
                    net.status
                        .as_ref()
                        .map(|s| s.conditions.clone())
                        .unwrap_or_default()
                });
                for ev in condition_events(&net, &before, &status.conditions) {
                    if let Err(e) = recorder.publish(&ev, &net.object_ref(&())).await {
                        tracing::debug!(error = %e, "event not recorded");
                    }
                }
                last.insert(net.key(), status.conditions.clone());
            }
        };
        (Self { tx }, task)
    }
}

/// Events for the conditions that changed from `before` to `after`: each
/// says what the new condition says, and only when it changed.
fn condition_events(net: &L2Network, before: &[Condition], after: &[Condition]) -> Vec<Event> {
    let changed = |type_: &str| {
        let new = after.iter().find(|c| c.type_ == type_)?;
        let old = before.iter().find(|c| c.type_ == type_);
        (old.map(|c| (&c.status, &c.reason)) != Some((&new.status, &new.reason))).then_some(new)
    };
    let event = |type_: EventType, reason: &str, action: &str, note: &str| Event {
        type_,
        reason: reason.into(),
        note: Some(note.to_owned()),
        action: action.into(),
        secondary: None,
    };
    let mut out = Vec::new();
    if let Some(c) = changed("Ready") {
        match (c.status.as_str(), c.reason.as_str()) {
            ("True", _) => out.push(event(EventType::Normal, "Ready", "Configure", &c.message)),
            ("False", r @ ("Invalid" | "NameConflict" | "Unavailable")) => {
                out.push(event(EventType::Warning, r, "Configure", &c.message));
            }
            _ => {}
        }
    }
    if net.spec.scope == crate::crd::Scope::MultiCluster
        && let Some(c) = changed("Admitted")
    {
        match c.status.as_str() {
            "True" => out.push(event(
                EventType::Normal,
                "Admitted",
                "RequestNetwork",
                &c.message,
            )),
            "False" => out.push(event(
                EventType::Warning,
                "NotAdmitted",
                "RequestNetwork",
                &c.message,
            )),
            _ => {}
        }
    }
    if let Some(c) = changed("Attachable").filter(|c| c.status == "False") {
        out.push(event(
            EventType::Warning,
            &c.reason,
            "CreateNAD",
            &c.message,
        ));
    }
    out
}

impl StatusSink for K8sStatusSink {
    fn write(&self, network: &L2Network, status: Option<&L2NetworkStatus>) {
        // A deleted network has no status to patch.
        if let Some(status) = status {
            let _ = self.tx.send((network.clone(), status.clone()));
        }
    }
}

/// Merge-patch the status subresource. Optional fields that no longer hold
/// are sent as `null`, so they are removed instead of kept from before.
pub async fn patch_status(
    client: &Client,
    net: &L2Network,
    status: &L2NetworkStatus,
) -> Result<(), kube::Error> {
    let nets: Api<L2Network> = api(client, net);
    let patch = serde_json::json!({"status": status_patch(status)});
    nets.patch_status(
        net.metadata.name.as_deref().unwrap_or_default(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map(drop)
}

/// The status as a merge patch: every field present, absent ones as `null`
/// (`linkHealth` is the per-link list older agents wrote: it goes).
fn status_patch(status: &L2NetworkStatus) -> serde_json::Value {
    let mut value = serde_json::to_value(status).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        for field in [
            "vni",
            "ipRange",
            "mtu",
            "observedGeneration",
            "links",
            "linkHealth",
        ] {
            map.entry(field).or_insert(serde_json::Value::Null);
        }
    }
    value
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
    fn the_status_patch_removes_what_no_longer_holds_and_the_old_link_list() {
        let patch = status_patch(&L2NetworkStatus::default());
        for field in ["vni", "links", "linkHealth", "ipRange"] {
            assert!(
                patch[field].is_null() && patch.get(field).is_some(),
                "{field}: {patch}"
            );
        }
    }

    #[test]
    fn a_local_nad_uses_the_spec_until_a_status_exists() {
        let n = net("{ipRange: 10.1.0.0/16, mtu: 1300}");
        let (range, mtu) = nad_inputs(&n);
        assert_eq!(range.map(|r| r.to_string()).as_deref(), Some("10.1.0.0/16"));
        assert_eq!(mtu, 1300);
    }
}
