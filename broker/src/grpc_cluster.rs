//! The `Broker` service: what cluster agents call.

use crate::conn::RequestConn;
use crate::error::Error;
use crate::hub::Slot;
use crate::model::Gateway;
use crate::server::{Broker, now_unix};
use crate::state::{sha256, tunnel_subnet, validate_name};
use futures::Stream;
use l2mesh_proto::broker as pb;
use l2mesh_proto::limits::{
    MAX_FIELD_BYTES, MAX_LABEL_BYTES, MAX_LINKS_PER_REPORT, check_len, preview,
};
use prost::Message as _;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::pin::Pin;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

const MAX_CSR_BYTES: usize = 16 << 10;
/// A cluster needs one watch stream; a few more cover reconnect overlap.
const MAX_STREAMS_PER_CLUSTER: usize = 8;

type ViewStream = Pin<Box<dyn Stream<Item = Result<pb::ClusterView, Status>> + Send>>;

fn gateway_from_pb(g: pb::Gateway) -> Result<Gateway, Error> {
    let tunnel_ip = g.tunnel_ip.parse().map_err(|_| {
        Error::InvalidArgument(format!(
            "gateway {:?}: tunnel_ip {:?} is not an IPv4 address",
            preview(&g.node),
            preview(&g.tunnel_ip)
        ))
    })?;
    Ok(Gateway {
        node: g.node,
        public_key: g.public_key,
        endpoints: g.endpoints,
        tunnel_ip,
    })
}

fn validate_links(links: &[pb::LinkHealth]) -> Result<(), Error> {
    if links.len() > MAX_LINKS_PER_REPORT {
        return Err(Error::InvalidArgument(format!(
            "the report has {} links; the limit is {MAX_LINKS_PER_REPORT}",
            links.len()
        )));
    }
    for l in links {
        check_len("link peer_cluster", &l.peer_cluster, MAX_LABEL_BYTES)
            .map_err(Error::InvalidArgument)?;
        if l.peer_public_key.len() > 32 {
            return Err(Error::InvalidArgument(format!(
                "link to {:?}: peer_public_key has {} bytes; a WireGuard key has 32",
                l.peer_cluster,
                l.peer_public_key.len()
            )));
        }
    }
    Ok(())
}

impl Broker {
    fn record<T>(&self, method: &str, r: Result<T, Error>) -> Result<T, Status> {
        let r = r.map_err(Status::from);
        self.metrics.call(
            method,
            r.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok),
        );
        r
    }

    async fn do_join(&self, ip: IpAddr, req: pb::JoinRequest) -> Result<pb::JoinResponse, Error> {
        let now = now_unix();
        let limited = self
            .limiter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .check(ip, &req.token_id, now);
        if let Err(wait) = limited {
            // Over the limit, only a valid token gets through: failures of
            // others (same NAT, same token id guessed) must not lock it out.
            let valid = self.current().check_token(
                &req.token_id,
                &req.token_secret,
                &req.cluster_name,
                now,
            );
            if valid.is_err() {
                self.metrics.join("rate_limited");
                tracing::warn!(peer = %ip, token_id = %preview(&req.token_id), "join refused: too many failures");
                return Err(Error::Exhausted(format!(
                    "too many failed joins from {ip} or for this token: retry in {wait} s"
                )));
            }
        }
        let result = self.join_checked(&req, now).await;
        if let Err(e) = &result {
            self.limiter
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .failed(ip, &req.token_id, now);
            self.metrics.join("denied");
            // The secret is never logged; the id and name are public.
            tracing::warn!(peer = %ip, token_id = %preview(&req.token_id), cluster = %preview(&req.cluster_name), reason = %e, "join refused");
        } else {
            self.metrics.join("ok");
            tracing::info!(peer = %ip, token_id = %req.token_id, cluster = %req.cluster_name, "cluster joined");
        }
        result
    }

    async fn join_checked(
        &self,
        req: &pb::JoinRequest,
        now: i64,
    ) -> Result<pb::JoinResponse, Error> {
        if req.token_id.is_empty() || req.token_secret.is_empty() {
            return Err(Error::InvalidArgument(
                "token_id and token_secret are required: pass the join string".into(),
            ));
        }
        for (field, value) in [
            ("token_id", &req.token_id),
            ("token_secret", &req.token_secret),
        ] {
            check_len(field, value, MAX_FIELD_BYTES).map_err(Error::InvalidArgument)?;
        }
        validate_name("cluster", &req.cluster_name)?;
        if req.csr_pem.len() > MAX_CSR_BYTES {
            return Err(Error::InvalidArgument(
                "csr_pem is larger than 16 KiB".into(),
            ));
        }
        // Check before signing so bad tokens cost no signature.
        self.check_token_fresh(&req.token_id, &req.token_secret, &req.cluster_name, now)
            .await?;
        let (cert_pem, cert_hash, _) = self.pki.sign_cluster_csr(
            &req.csr_pem,
            &req.cluster_name,
            self.config.cluster_cert_lifetime,
        )?;
        let (id, secret, name) = (
            req.token_id.clone(),
            req.token_secret.clone(),
            req.cluster_name.clone(),
        );
        let cluster = self
            .mutate(move |s| {
                let c = s.join(&id, &secret, &name, cert_hash, now)?;
                Ok((c, BTreeSet::from([name])))
            })
            .await?;
        Ok(pb::JoinResponse {
            cluster_name: cluster.name,
            client_cert_pem: cert_pem,
            ca_cert_pem: self.pki.ca_pem().to_owned(),
            tunnel_subnet: tunnel_subnet(cluster.subnet_index).to_string(),
        })
    }

    /// The calling cluster, if its report rate allows another report.
    async fn reporting_cluster<T>(&self, req: &Request<T>) -> Result<String, Error> {
        let name = self.require_cluster(req).await?;
        let now = tokio::time::Instant::now()
            .duration_since(self.started)
            .as_secs_f64();
        let allowed = self
            .reports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(&name, now);
        if let Err(wait) = allowed {
            self.metrics.reports_rate_limited.inc();
            return Err(Error::Exhausted(format!(
                "cluster {name:?} reports too often (limit: {} per minute, bursts of {}): retry in {:.1} s; reports that repeat the last one are not needed",
                self.config.reports_per_minute, self.config.report_burst, wait
            )));
        }
        Ok(name)
    }

    fn view_rev(&self, name: &str) -> u64 {
        self.current().clusters.get(name).map_or(0, |c| c.view_rev)
    }

    async fn do_watch(&self, req: Request<pb::WatchRequest>) -> Result<ViewStream, Error> {
        let name = self.require_cluster(&req).await?;
        let cert = req
            .extensions()
            .get::<RequestConn>()
            .and_then(RequestConn::peer_certs)
            .and_then(|c| c.first().map(|c| sha256(c)))
            .unwrap_or_default();
        if self.hub.streams_of(&name) >= MAX_STREAMS_PER_CLUSTER {
            return Err(Error::Exhausted(format!(
                "cluster {name:?} already has {MAX_STREAMS_PER_CLUSTER} watch streams open: close some first"
            )));
        }
        let rx = self
            .hub
            .subscribe(&name)
            .ok_or_else(|| Error::Unauthenticated(format!("cluster {name:?} was removed")))?;
        let asked = req.get_ref().last_revision;
        let deltas = req.get_ref().deltas;
        let current = self.view_rev(&name);
        let future = asked > current;
        if future {
            // Defined answer: a snapshot, whose lower revision tells the
            // agent to replace everything it holds.
            tracing::warn!(cluster = %name, last_revision = asked, current, "watch resumes from a revision this broker never issued (store restored or replaced?): sending a snapshot");
        }
        tracing::info!(cluster = %name, last_revision = asked, deltas, "watch opened");
        let st = WatchState {
            name: name.clone(),
            rx,
            shutdown: self.hub.shutdown_signal(),
            cert,
            last_sent: asked,
            deltas,
            snapshot_due: future,
            sent_at: None,
            done: false,
            broker: self.clone(),
            _guard: self.hub.connect(&name),
        };
        self.metrics
            .watchers
            .set(i64::try_from(self.hub.watchers()).unwrap_or(i64::MAX));
        Ok(Box::pin(futures::stream::unfold(st, next_view)))
    }
}

struct WatchState {
    name: String,
    rx: watch::Receiver<Slot>,
    shutdown: watch::Receiver<bool>,
    cert: [u8; 32],
    last_sent: u64,
    /// The client applies deltas.
    deltas: bool,
    /// The next message must be a snapshot.
    snapshot_due: bool,
    sent_at: Option<tokio::time::Instant>,
    done: bool,
    broker: Broker,
    _guard: crate::hub::ConnGuard,
}

impl Drop for WatchState {
    fn drop(&mut self) {
        tracing::info!(cluster = %self.name, last_revision = self.last_sent, "watch closed");
        let n = self.broker.hub.watchers().saturating_sub(1);
        self.broker
            .metrics
            .watchers
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

async fn next_view(mut st: WatchState) -> Option<(Result<pb::ClusterView, Status>, WatchState)> {
    loop {
        if st.done || *st.shutdown.borrow() {
            return None;
        }
        let current = st.rx.borrow_and_update().clone();
        match current {
            None => {
                st.done = true;
                return Some((
                    Err(Status::unauthenticated(
                        "this cluster was removed from the broker; its certificate no longer works",
                    )),
                    st,
                ));
            }
            Some(p) if !p.certs.contains(&st.cert) => {
                st.done = true;
                return Some((
                    Err(Status::unauthenticated(
                        "this certificate was replaced by a newer join of the same cluster",
                    )),
                    st,
                ));
            }
            Some(p) if p.revision != st.last_sent || st.snapshot_due => {
                // Changes that come faster than the view interval are
                // merged: wait out the interval, then send what is new.
                let interval = st.broker.config.view_interval;
                if let Some(at) = st.sent_at
                    && at.elapsed() < interval
                {
                    tokio::select! {
                        () = tokio::time::sleep_until(at + interval) => {}
                        _ = st.shutdown.changed() => return None,
                    }
                    continue;
                }
                let delta = (st.deltas && !st.snapshot_due)
                    .then(|| p.since(st.last_sent))
                    .flatten();
                let msg = match delta {
                    Some(delta) => {
                        st.broker.metrics.deltas_sent.inc();
                        pb::ClusterView {
                            revision: p.revision,
                            cluster_name: st.name.clone(),
                            delta: Some(delta),
                            ..pb::ClusterView::default()
                        }
                    }
                    None => {
                        let Some(view) = crate::view::compute(&st.broker.current(), &st.name)
                        else {
                            st.done = true;
                            return Some((
                                Err(Status::unauthenticated(
                                    "this cluster was removed from the broker",
                                )),
                                st,
                            ));
                        };
                        st.broker.metrics.views_sent.inc();
                        view
                    }
                };
                st.snapshot_due = false;
                st.last_sent = msg.revision;
                st.sent_at = Some(tokio::time::Instant::now());
                st.broker
                    .metrics
                    .watch_bytes_sent
                    .inc_by(msg.encoded_len() as u64);
                return Some((Ok(msg), st));
            }
            Some(_) => {}
        }
        tokio::select! {
            changed = st.rx.changed() => {
                if changed.is_err() {
                    // The sender is dropped only when the cluster is removed.
                    st.done = true;
                    return Some((Err(Status::unauthenticated("this cluster was removed from the broker")), st));
                }
            }
            _ = st.shutdown.changed() => return None,
        }
    }
}

#[tonic::async_trait]
impl pb::broker_server::Broker for Broker {
    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let ip = req
            .extensions()
            .get::<RequestConn>()
            .map_or(IpAddr::from([0, 0, 0, 0]), |c| {
                c.get_ref().remote.ip().to_canonical()
            });
        let r = self.do_join(ip, req.into_inner()).await;
        self.record("Join", r).map(Response::new)
    }

    async fn report_gateways(
        &self,
        req: Request<pb::GatewayReport>,
    ) -> Result<Response<pb::ReportAck>, Status> {
        let r = async {
            let name = self.reporting_cluster(&req).await?;
            let gateways = req
                .into_inner()
                .gateways
                .into_iter()
                .map(gateway_from_pb)
                .collect::<Result<Vec<_>, _>>()?;
            let n = name.clone();
            self.mutate(move |s| Ok(((), s.report_gateways(&n, gateways)?)))
                .await?;
            Ok(pb::ReportAck {
                revision: self.view_rev(&name),
            })
        }
        .await;
        self.record("ReportGateways", r).map(Response::new)
    }

    async fn request_networks(
        &self,
        req: Request<pb::NetworkRequest>,
    ) -> Result<Response<pb::NetworkRequestResult>, Status> {
        let r = async {
            let name = self.reporting_cluster(&req).await?;
            let nets = req.into_inner().networks;
            let n = name.clone();
            self.mutate(move |s| Ok(((), s.request_networks(&n, nets)?)))
                .await?;
            let admissions = crate::view::admissions(&self.current(), &name);
            Ok(pb::NetworkRequestResult { admissions })
        }
        .await;
        self.record("RequestNetworks", r).map(Response::new)
    }

    async fn report_link_health(
        &self,
        req: Request<pb::LinkHealthReport>,
    ) -> Result<Response<pb::ReportAck>, Status> {
        let r = async {
            let name = self.reporting_cluster(&req).await?;
            let links = req.into_inner().links;
            validate_links(&links)?;
            // Link health changes all the time and no view depends on it:
            // it lives in memory only, replaced by each report.
            self.health
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(name.clone(), links);
            Ok(pb::ReportAck {
                revision: self.view_rev(&name),
            })
        }
        .await;
        self.record("ReportLinkHealth", r).map(Response::new)
    }

    async fn renew_certificate(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let r = async {
            let name = self.require_cluster(&req).await?;
            let current = req
                .extensions()
                .get::<RequestConn>()
                .and_then(RequestConn::peer_certs)
                .and_then(|c| c.first().map(|c| sha256(c)))
                .ok_or_else(|| Error::Unauthenticated("no client certificate".into()))?;
            let csr = req.into_inner().csr_pem;
            if csr.len() > MAX_CSR_BYTES {
                return Err(Error::InvalidArgument(
                    "csr_pem is larger than 16 KiB".into(),
                ));
            }
            let (pem, hash, not_after) =
                self.pki
                    .sign_cluster_csr(&csr, &name, self.config.cluster_cert_lifetime)?;
            let n = name.clone();
            self.mutate(move |s| {
                s.renew_cert(&n, current, hash)?;
                Ok(((), BTreeSet::from([n])))
            })
            .await?;
            tracing::info!(cluster = %name, not_after_unix = not_after, "certificate renewed");
            Ok(pb::RenewResponse {
                client_cert_pem: pem,
                not_after_unix: not_after,
            })
        }
        .await;
        self.record("RenewCertificate", r).map(Response::new)
    }

    type WatchStream = ViewStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<ViewStream>, Status> {
        let r = self.do_watch(req).await;
        self.record("Watch", r).map(Response::new)
    }
}
