//! `l2mesh-agent uninstall`: remove every L2Network while the agent still
//! runs, so that the agent releases each one (NAD deleted, network dropped
//! from the nodes and the broker, finalizer removed) before the agent itself
//! goes. Run as the Helm chart's pre-delete hook or by hand.
//!
//! The decisions (is an agent alive, what is left, what to tell the
//! operator) are plain functions; [`run`] does the API calls.

use crate::crd::L2Network;
use crate::k8s::LEASE_NAME;
use crate::k8s::controller::FINALIZER;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use std::time::Duration;

/// Why the uninstall did not finish.
#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error(
        "no l2mesh-agent is running in namespace {namespace} ({why}); deleting the L2Networks now \
         would leave them Terminating, because only the agent releases them. Start the agent \
         first (or check --namespace), or pass --clear-finalizers to delete them without it \
         (the broker then keeps this cluster's memberships: run `l2mesh-broker cluster remove` there)"
    )]
    NoAgent { namespace: String, why: String },
    #[error(
        "{} L2Network(s) still present after {}s: {}. Check the agent's log \
         (kubectl logs -n {namespace} deploy/l2mesh-agent); to give up on them run again \
         with --clear-finalizers",
        remaining.len(), waited.as_secs(), remaining.join(", ")
    )]
    Stuck {
        namespace: String,
        remaining: Vec<String>,
        waited: Duration,
    },
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
}

/// What `run` does.
#[derive(Clone, Debug)]
pub struct UninstallConfig {
    /// Namespace of the agent (its leader Lease).
    pub namespace: String,
    /// Give up after this long with the names of what is left.
    pub timeout: Duration,
    /// Remove our finalizer instead of waiting for an agent to release it.
    pub clear_finalizers: bool,
    /// How often the remaining L2Networks are listed.
    pub poll: Duration,
}

/// What was done, for the closing line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub deleted: usize,
    pub finalizers_cleared: usize,
}

/// The holder of a lease that has not run out at `now`, if any.
#[must_use]
pub fn live_holder(spec: Option<&LeaseSpec>, now: Timestamp) -> Option<String> {
    let spec = spec?;
    let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty())?;
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    let renewed = spec.renew_time.as_ref().map(|t| t.0)?;
    (renewed + duration > now).then(|| holder.to_owned())
}

/// Why no agent is alive, given the lease as read.
#[must_use]
pub fn why_no_agent(lease: Option<&Lease>, now: Timestamp) -> Option<String> {
    let Some(lease) = lease else {
        return Some(format!("there is no Lease {LEASE_NAME}"));
    };
    let spec = lease.spec.as_ref();
    if live_holder(spec, now).is_some() {
        return None;
    }
    let renewed = spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0);
    Some(match renewed {
        Some(t) => format!(
            "Lease {LEASE_NAME} was last renewed {}s ago",
            now.duration_since(t).as_secs().max(0)
        ),
        None => format!("Lease {LEASE_NAME} has no holder"),
    })
}

/// `namespace/name` of an L2Network.
fn label(net: &L2Network) -> String {
    format!("{}/{}", net.namespace().unwrap_or_default(), net.name_any())
}

/// The finalizer list without ours, or `None` if ours is not there.
#[must_use]
pub fn finalizers_without_ours(finalizers: &[String]) -> Option<Vec<String>> {
    finalizers.iter().any(|f| f == FINALIZER).then(|| {
        finalizers
            .iter()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect()
    })
}

/// Delete every L2Network in the cluster and wait until they are gone.
/// `progress` gets one line whenever what is left changes.
pub async fn run(
    client: Client,
    config: &UninstallConfig,
    mut progress: impl FnMut(&str),
) -> Result<Summary, UninstallError> {
    let nets: Api<L2Network> = Api::all(client.clone());
    let mut summary = Summary::default();

    if !config.clear_finalizers {
        let leases: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
        let lease = leases.get_opt(LEASE_NAME).await?;
        if let Some(why) = why_no_agent(lease.as_ref(), Timestamp::now()) {
            return Err(UninstallError::NoAgent {
                namespace: config.namespace.clone(),
                why,
            });
        }
    }

    let existing = nets.list(&ListParams::default()).await?.items;
    if existing.is_empty() {
        progress("no L2Networks to delete");
        return Ok(summary);
    }
    progress(&format!("deleting {} L2Network(s)", existing.len()));
    for net in &existing {
        if net.metadata.deletion_timestamp.is_none() {
            let ns = net.namespace().unwrap_or_default();
            let api: Api<L2Network> = Api::namespaced(client.clone(), &ns);
            match api.delete(&net.name_any(), &DeleteParams::default()).await {
                Ok(_) => summary.deleted += 1,
                // Gone meanwhile: what we wanted.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    let started = tokio::time::Instant::now();
    let mut last_report = None;
    loop {
        let left = nets.list(&ListParams::default()).await?.items;
        if config.clear_finalizers {
            for net in &left {
                summary.finalizers_cleared += clear_finalizer(&client, net).await?;
            }
        }
        let names: Vec<String> = left.iter().map(label).collect();
        if names.is_empty() {
            progress("all L2Networks are gone");
            return Ok(summary);
        }
        if last_report.as_ref() != Some(&names) {
            progress(&format!(
                "waiting for the agent to release {} L2Network(s): {}",
                names.len(),
                names.join(", ")
            ));
            last_report = Some(names.clone());
        }
        if started.elapsed() >= config.timeout {
            return Err(UninstallError::Stuck {
                namespace: config.namespace.clone(),
                remaining: names,
                waited: started.elapsed(),
            });
        }
        tokio::time::sleep(config.poll).await;
    }
}

/// Remove our finalizer from `net` (1 if removed).
async fn clear_finalizer(client: &Client, net: &L2Network) -> Result<usize, UninstallError> {
    let Some(kept) = finalizers_without_ours(net.finalizers()) else {
        return Ok(0);
    };
    let api: Api<L2Network> = Api::namespaced(client.clone(), &net.namespace().unwrap_or_default());
    // The resourceVersion makes this a compare-and-set: a finalizer another
    // controller added meanwhile is not dropped.
    let patch = serde_json::json!({
        "metadata": {"finalizers": kept, "resourceVersion": net.resource_version()}
    });
    match api
        .patch(
            &net.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(1),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(0),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn spec(holder: Option<&str>, renewed_secs_ago: Option<i64>, now: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            lease_duration_seconds: Some(15),
            renew_time: renewed_secs_ago.map(|s| MicroTime(now - SignedDuration::from_secs(s))),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn an_agent_is_alive_only_while_its_lease_runs() {
        let now = Timestamp::now();
        assert_eq!(
            live_holder(Some(&spec(Some("agent-0"), Some(3), now)), now).as_deref(),
            Some("agent-0")
        );
        assert_eq!(
            live_holder(Some(&spec(Some("agent-0"), Some(60), now)), now),
            None
        );
        assert_eq!(live_holder(Some(&spec(Some(""), Some(1), now)), now), None);
        assert_eq!(
            live_holder(Some(&spec(Some("agent-0"), None, now)), now),
            None
        );
        assert_eq!(live_holder(None, now), None);
    }

    #[test]
    fn the_reason_names_the_lease_and_its_age() {
        let now = Timestamp::now();
        assert!(
            why_no_agent(None, now)
                .unwrap()
                .contains("no Lease l2mesh-agent")
        );
        let stale = Lease {
            spec: Some(spec(Some("agent-0"), Some(600), now)),
            ..Lease::default()
        };
        assert!(
            why_no_agent(Some(&stale), now)
                .unwrap()
                .contains("600s ago")
        );
        let live = Lease {
            spec: Some(spec(Some("agent-0"), Some(1), now)),
            ..Lease::default()
        };
        assert_eq!(why_no_agent(Some(&live), now), None);
    }

    #[test]
    fn only_our_finalizer_is_removed() {
        let other = "example.com/keep".to_owned();
        assert_eq!(
            finalizers_without_ours(&[FINALIZER.to_owned(), other.clone()]),
            Some(vec![other.clone()])
        );
        assert_eq!(finalizers_without_ours(&[other]), None);
        assert_eq!(finalizers_without_ours(&[]), None);
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = UninstallError::NoAgent {
            namespace: "l2mesh-system".into(),
            why: "there is no Lease l2mesh-agent".into(),
        };
        let text = e.to_string();
        assert!(text.contains("--clear-finalizers") && text.contains("l2mesh-system"));
        let e = UninstallError::Stuck {
            namespace: "l2mesh-system".into(),
            remaining: vec!["default/blue".into()],
            waited: Duration::from_secs(5),
        };
        let text = e.to_string();
        assert!(
            text.contains("default/blue") && text.contains("kubectl logs"),
            "{text}"
        );
    }
}
