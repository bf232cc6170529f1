//! The agent's session with the broker: mTLS with the cluster identity, a
//! watch on the cluster view that resumes from the last revision (a
//! snapshot first, then deltas applied to the view held), and the
//! reports (gateways, requested networks, link health). Reconnects with
//! backoff; the nodes keep their last state meanwhile. Two thirds into the
//! certificate's life the session renews it (no token needed), stores the
//! new identity and reconnects with it.

use crate::engine::Shared;
use crate::identity::{Backoff, Identity};
use crate::tls;
use l2mesh_proto::broker::broker_client::BrokerClient;
use l2mesh_proto::broker::{
    ClusterView, GatewayReport, LinkHealthReport, NetworkRequest, WatchRequest,
};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;

/// How long to wait before trying a failed certificate renewal again.
const RENEW_RETRY: Duration = Duration::from_secs(600);

/// How often link health goes to the broker.
const LINK_HEALTH_EVERY: Duration = Duration::from_secs(10);

/// How long to wait before sending a report the broker could not take
/// (its store lost quorum, or this cluster's report rate was exceeded).
const REPORT_RETRY: Duration = Duration::from_secs(3);

/// What a failed report means for the broker session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReportFailure {
    /// The broker refused what we said: log it, do not resend it as is.
    Refused,
    /// The broker cannot take it now: keep the session (and the view) up
    /// and send it again after [`REPORT_RETRY`].
    Later,
    /// The session is broken: reconnect.
    Session,
}

fn report_failure(code: tonic::Code) -> ReportFailure {
    use tonic::Code;
    match code {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            ReportFailure::Refused
        }
        Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded | Code::Aborted => {
            ReportFailure::Later
        }
        _ => ReportFailure::Session,
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// The order in which to try `n` broker addresses, starting at `first`.
fn try_order(n: usize, first: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (first + i) % n.max(1))
}

/// Connect to the first broker (replica) that answers, trying them in turn
/// from `*first`. On success `*first` moves past the one connected to: the
/// next reconnect (its stream broke: that replica may be gone) tries the
/// others before coming back to it.
async fn connect(id: &Identity, first: &mut usize) -> Result<BrokerClient<Channel>, String> {
    let pin = id.pin().map_err(|e| e.to_string())?;
    let config = tls::broker_client_config(pin, Some((&id.cert_pem, &id.key_pem)))
        .map_err(|e| e.to_string())?;
    let mut errors = Vec::new();
    for at in try_order(id.brokers.len(), *first) {
        let addr = &id.brokers[at];
        match tls::broker_channel(addr, config.clone()).await {
            Ok(ch) => {
                if id.brokers.len() > 1 {
                    tracing::info!(broker = %addr, "connected to broker replica");
                }
                *first = at + 1;
                return Ok(BrokerClient::new(ch)
                    .max_decoding_message_size(l2mesh_proto::limits::MAX_MESSAGE_BYTES));
            }
            Err(e) => errors.push(l2mesh_telemetry::error_chain(&e)),
        }
    }
    Err(errors.join("; "))
}

/// What to tell the operator when the broker refuses our identity.
fn refusal(broker_says: &str) -> String {
    format!(
        "the broker refuses this cluster ({broker_says}): it may have been removed; to rejoin, delete the stored identity and start with a new join string"
    )
}

/// Keeps a renewed identity where the agent stores it (file or Secret).
pub type StoreIdentity = Arc<
    dyn Fn(
            Identity,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;

/// Renew the certificate if it is due; the new identity is stored first.
async fn renew_if_due(
    id: &mut Identity,
    client: &mut BrokerClient<Channel>,
    store: &StoreIdentity,
) -> Result<bool, String> {
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
    )
    .unwrap_or(i64::MAX);
    if id.renew_after_unix().is_none_or(|t| now < t) {
        return Ok(false);
    }
    let renewed = id.renew(client).await?;
    store(renewed.clone())
        .await
        .map_err(|e| format!("cannot store the renewed certificate: {e}"))?;
    tracing::info!(cluster = %id.cluster, "certificate renewed");
    *id = renewed;
    Ok(true)
}

/// Run until the process stops.
pub async fn run(mut id: Identity, shared: Arc<Shared>, store: StoreIdentity) {
    let mut backoff = Backoff::default();
    // Which broker replica to try first: the one after the last connected to.
    let mut first = 0;
    // The view as the broker last sent it in this run: deltas apply to it,
    // and a reconnect resumes from its revision.
    let mut held: Option<ClusterView> = None;
    loop {
        match session(
            &mut id,
            &shared,
            &mut backoff,
            &store,
            &mut first,
            &mut held,
        )
        .await
        {
            Ok(()) => tracing::warn!("the broker closed the watch; reconnecting"),
            Err(e) => tracing::warn!(error = %e, "broker session failed"),
        }
        let delay = backoff.next_delay();
        tokio::time::sleep(delay).await;
    }
}

async fn session(
    id: &mut Identity,
    shared: &Shared,
    backoff: &mut Backoff,
    store: &StoreIdentity,
    first: &mut usize,
    held: &mut Option<ClusterView>,
) -> Result<(), String> {
    let mut client = connect(id, first).await?;
    let mut renew_failed = false;
    match renew_if_due(id, &mut client, store).await {
        Ok(true) => {
            *first = first.saturating_sub(1);
            client = connect(id, first).await?;
        }
        Ok(false) => {}
        // The current certificate still works: try again a while later.
        Err(e) => {
            tracing::warn!(error = %e, retry_in = ?RENEW_RETRY, "certificate renewal failed");
            renew_failed = true;
        }
    }
    let mut stream = client
        .watch(WatchRequest {
            last_revision: held.as_ref().map_or(0, |v| v.revision),
            deltas: true,
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                let why = refusal(s.message());
                shared.set_broker_refusal(Some(why.clone()));
                why
            }
            _ => format!("watch: {}", s.message()),
        })?
        .into_inner();
    shared.set_broker_refusal(None);
    tracing::info!(cluster = %id.cluster, "broker session up");
    backoff.reset();
    shared.metrics.broker_connected.set(1);
    let renew_in = if renew_failed {
        Some(RENEW_RETRY)
    } else {
        id.renew_after_unix().map(|t| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            Duration::from_secs(u64::try_from(t).unwrap_or(0).saturating_sub(now))
        })
    };
    let result = session_loop(&mut client, &mut stream, shared, renew_in, held).await;
    shared.metrics.broker_connected.set(0);
    result
}

/// Apply one watch message to the view held and hand the result to the
/// engine. A delta that does not fit the view held (a broker bug, or a
/// stream crossed with a restore) drops the view: the next session starts
/// from a snapshot.
fn apply_view(
    shared: &Shared,
    held: &mut Option<ClusterView>,
    msg: ClusterView,
) -> Result<(), String> {
    let delta = l2mesh_proto::view::is_delta(&msg);
    if let Err(e) = l2mesh_proto::view::apply(held, msg) {
        *held = None;
        return Err(format!("watch: {e}: resuming from a snapshot"));
    }
    let Some(view) = held.as_ref() else {
        return Ok(());
    };
    tracing::info!(
        revision = view.revision,
        networks = view.networks.len(),
        delta,
        "cluster view"
    );
    shared.metrics.broker_views.inc();
    shared.set_view(view.clone());
    Ok(())
}

async fn session_loop(
    client: &mut BrokerClient<Channel>,
    stream: &mut tonic::Streaming<ClusterView>,
    shared: &Shared,
    renew_in: Option<Duration>,
    held: &mut Option<ClusterView>,
) -> Result<(), String> {
    let mut reports = shared.reports();
    reports.mark_changed();
    let mut ticker = tokio::time::interval(LINK_HEALTH_EVERY);
    // None when the certificate cannot be read: no renewal is due then.
    let renew_at = renew_in.map(|d| tokio::time::Instant::now() + d);
    // When to send again a report the broker could not take.
    let mut resend_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            () = until(resend_at) => {
                resend_at = None;
                reports.mark_changed();
            }
            () = until(renew_at) => {
                tracing::info!("certificate renewal due: reconnecting to renew it");
                return Ok(());
            }
            msg = stream.message() => match msg {
                Ok(Some(msg)) => apply_view(shared, held, msg)?,
                Ok(None) => return Ok(()),
                Err(s) if matches!(s.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied) => {
                    let why = refusal(s.message());
                    shared.set_broker_refusal(Some(why.clone()));
                    return Err(why);
                }
                Err(s) => return Err(format!("watch: {}", s.message())),
            },
            changed = reports.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                // Nothing is reported before the intent is complete: a
                // request made from half of it would drop this cluster from
                // networks it is in.
                let Some(r) = reports.borrow_and_update().clone() else {
                    continue;
                };
                // A report the broker refuses is logged, not retried in a
                // loop; one it cannot take now is sent again later. Either
                // way the session (and the view) stays up.
                if let Err(s) = client.report_gateways(GatewayReport { gateways: r.gateways }).await {
                    match report_failure(s.code()) {
                        ReportFailure::Refused => {
                            tracing::error!(error = %s.message(), "the broker refused the gateway report");
                        }
                        ReportFailure::Later => {
                            tracing::warn!(error = %s.message(), retry_in = ?REPORT_RETRY, "the broker cannot take the gateway report now");
                            resend_at = Some(tokio::time::Instant::now() + REPORT_RETRY);
                            continue;
                        }
                        ReportFailure::Session => return Err(format!("report gateways: {}", s.message())),
                    }
                }
                match client.request_networks(NetworkRequest { networks: r.networks }).await {
                    Ok(answer) => {
                        let answer = answer.into_inner();
                        for a in &answer.admissions {
                            tracing::info!(network = %a.network, state = ?a.state(), reason = %a.reason, "admission");
                        }
                        shared.set_admissions(answer.admissions);
                    }
                    Err(s) => match report_failure(s.code()) {
                        ReportFailure::Refused => {
                            tracing::error!(error = %s.message(), "the broker refused the network request");
                        }
                        ReportFailure::Later => {
                            tracing::warn!(error = %s.message(), retry_in = ?REPORT_RETRY, "the broker cannot take the network request now");
                            resend_at = Some(tokio::time::Instant::now() + REPORT_RETRY);
                        }
                        ReportFailure::Session => return Err(format!("request networks: {}", s.message())),
                    },
                }
            }
            _ = ticker.tick() => {
                let links = shared.link_health();
                if !links.is_empty() {
                    // The next tick sends fresh health anyway: a report the
                    // broker cannot take now is not resent.
                    if let Err(s) = client.report_link_health(LinkHealthReport { links }).await {
                        match report_failure(s.code()) {
                            ReportFailure::Refused | ReportFailure::Later => {
                                tracing::warn!(error = %s.message(), "the broker did not take the link health report");
                            }
                            ReportFailure::Session => return Err(format!("report link health: {}", s.message())),
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{ReportFailure, report_failure, try_order};

    #[test]
    fn a_broker_that_cannot_take_a_report_now_keeps_the_session() {
        use tonic::Code;
        for code in [
            Code::Unavailable,
            Code::ResourceExhausted,
            Code::DeadlineExceeded,
        ] {
            assert_eq!(report_failure(code), ReportFailure::Later, "{code:?}");
        }
        assert_eq!(
            report_failure(Code::InvalidArgument),
            ReportFailure::Refused
        );
        for code in [
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::Internal,
        ] {
            assert_eq!(report_failure(code), ReportFailure::Session, "{code:?}");
        }
    }

    #[test]
    fn replicas_are_tried_in_turn_from_the_one_after_the_last_used() {
        assert_eq!(try_order(3, 0).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(try_order(3, 1).collect::<Vec<_>>(), vec![1, 2, 0]);
        assert_eq!(try_order(3, 3).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(try_order(1, 1).collect::<Vec<_>>(), vec![0]);
        assert_eq!(try_order(0, 0).count(), 0);
    }
}
