//! Leader election on a `coordination.k8s.io` Lease, so two agent replicas
//! never both act. The decision is pure ([`decide`]); [`LeaseLock`] does the
//! API calls with optimistic concurrency (resourceVersion), so two replicas
//! racing for an expired lease cannot both win.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};

/// What to do with the lease as it is now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// We hold it: renew.
    Renew,
    /// Nobody holds it (or the holder's time ran out): take it.
    TakeOver,
    /// Someone else holds it.
    Wait,
}

/// Decide from the lease spec, our identity and the time.
#[must_use]
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else {
        return Decision::TakeOver;
    };
    match spec.holder_identity.as_deref() {
        Some(h) if h == me => Decision::Renew,
        None | Some("") => Decision::TakeOver,
        Some(_) => {
            let duration =
                SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
            let renewed = spec.renew_time.as_ref().map(|t| t.0);
            match renewed {
                Some(t) if t + duration > now => Decision::Wait,
                _ => Decision::TakeOver,
            }
        }
    }
}

/// A lease we try to hold.
#[derive(Clone)]
pub struct LeaseLock {
    pub api: Api<Lease>,
    pub name: String,
    pub me: String,
    pub duration_secs: i32,
}

impl std::fmt::Debug for LeaseLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseLock")
            .field("name", &self.name)
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl LeaseLock {
    /// One round: `Ok(true)` if we hold the lease afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let current = match self.api.get_opt(&self.name).await? {
            Some(l) => l,
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(None, now)),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                };
            }
        };
        let decision = decide(current.spec.as_ref(), &self.me, now);
        if decision == Decision::Wait {
            return Ok(false);
        }
        let mut next = current.clone();
        next.spec = Some(
            self.spec(
                current
                    .spec
                    .as_ref()
                    .filter(|_| decision == Decision::Renew),
                now,
            ),
        );
        if decision == Decision::TakeOver {
            let transitions = current
                .spec
                .as_ref()
                .and_then(|s| s.lease_transitions)
                .unwrap_or(0);
            if let Some(spec) = next.spec.as_mut() {
                spec.lease_transitions = Some(transitions + 1);
            }
        }
        // `replace` carries the resourceVersion we read: a concurrent writer makes it 409.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Give the lease up if we hold it, so that another replica need not
    /// wait for it to run out.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut current) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = current.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.me.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &current)
            .await
        {
            Ok(_) | Err(kube::Error::Api(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn spec(&self, renewing: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.me.clone()),
            lease_duration_seconds: Some(self.duration_secs),
            acquire_time: renewing
                .and_then(|s| s.acquire_time.clone())
                .or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: renewing.and_then(|s| s.lease_transitions).or(Some(0)),
            ..LeaseSpec::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed_secs_ago: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(
                Timestamp::now() - SignedDuration::from_secs(renewed_secs_ago),
            )),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn decisions() {
        let now = Timestamp::now();
        assert_eq!(decide(None, "a", now), Decision::TakeOver);
        assert_eq!(decide(Some(&spec("a", 1)), "a", now), Decision::Renew);
        assert_eq!(decide(Some(&spec("b", 1)), "a", now), Decision::Wait);
        assert_eq!(decide(Some(&spec("b", 60)), "a", now), Decision::TakeOver);
        assert_eq!(decide(Some(&spec("", 1)), "a", now), Decision::TakeOver);
    }
}
