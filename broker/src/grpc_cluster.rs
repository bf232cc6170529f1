//! The `Broker` service: what cluster agents call.

use crate::error::Error;
use crate::hub::Slot;
use crate::model::{Gateway, Link};
use crate::server::{Broker, now_unix};
use crate::state::{sha256, tunnel_subnet, validate_name};
use futures::Stream;
use l2mesh_proto::broker as pb;
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
            g.node, g.tunnel_ip
        ))
    })?;
    Ok(Gateway {
        node: g.node,
        public_key: g.public_key,
        endpoints: g.endpoints,
        tunnel_ip,
    })
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
        {
            let mut limiter = self
                .limiter
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Err(wait) = limiter.check(ip, now) {
                self.metrics.join("rate_limited");
                tracing::warn!(peer = %ip, token_id = %req.token_id, "join refused: too many failures");
                return Err(Error::Exhausted(format!(
                    "too many failed joins from {ip}: retry in {wait} s"
                )));
            }
        }
        let result = self.join_checked(&req, now).await;
        if let Err(e) = &result {
            self.limiter
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .failed(ip, now);
            self.metrics.join("denied");
            // The secret is never logged; the id and name are public.
            tracing::warn!(peer = %ip, token_id = %req.token_id, cluster = %req.cluster_name, reason = %e, "join refused");
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
        validate_name("cluster", &req.cluster_name)?;
        if req.csr_pem.len() > MAX_CSR_BYTES {
            return Err(Error::InvalidArgument(
                "csr_pem is larger than 16 KiB".into(),
            ));
        }
        // Check before signing so bad tokens cost no signature.
        self.core.lock().await.state.check_token(
            &req.token_id,
            &req.token_secret,
            &req.cluster_name,
            now,
        )?;
        let (cert_pem, cert_hash) = self.pki.sign_cluster_csr(&req.csr_pem, &req.cluster_name)?;
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

    async fn view_rev(&self, name: &str) -> u64 {
        self.core
            .lock()
            .await
            .state
            .clusters
            .get(name)
            .map_or(0, |c| c.view_rev)
    }

    async fn do_watch(&self, req: Request<pb::WatchRequest>) -> Result<ViewStream, Error> {
        let name = self.require_cluster(&req).await?;
        let cert = req
            .peer_certs()
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
        tracing::info!(cluster = %name, last_revision = req.get_ref().last_revision, "watch opened");
        let st = WatchState {
            name: name.clone(),
            rx,
            shutdown: self.hub.shutdown_signal(),
            cert,
            last_sent: req.get_ref().last_revision,
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
            Some(p) if p.cert != st.cert => {
                st.done = true;
                return Some((
                    Err(Status::unauthenticated(
                        "this certificate was replaced by a newer join of the same cluster",
                    )),
                    st,
                ));
            }
            Some(p) if p.view.revision != st.last_sent => {
                st.last_sent = p.view.revision;
                st.broker.metrics.views_sent.inc();
                return Some((Ok((*p.view).clone()), st));
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
            .remote_addr()
            .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
        let r = self.do_join(ip, req.into_inner()).await;
        self.record("Join", r).map(Response::new)
    }

    async fn report_gateways(
        &self,
        req: Request<pb::GatewayReport>,
    ) -> Result<Response<pb::ReportAck>, Status> {
        let r = async {
            let name = self.require_cluster(&req).await?;
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
                revision: self.view_rev(&name).await,
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
            let name = self.require_cluster(&req).await?;
            let nets = req.into_inner().networks;
            let n = name.clone();
            self.mutate(move |s| Ok(((), s.request_networks(&n, nets)?)))
                .await?;
            let core = self.core.lock().await;
            let admissions = crate::view::compute(&core.state, &name)
                .map(|v| v.admissions)
                .unwrap_or_default();
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
            let name = self.require_cluster(&req).await?;
            let links = req
                .into_inner()
                .links
                .into_iter()
                .map(|l| Link {
                    peer_cluster: l.peer_cluster,
                    peer_public_key: l.peer_public_key,
                    up: l.up,
                    last_handshake_age_ms: l.last_handshake_age_ms,
                    rx_bytes: l.rx_bytes,
                    tx_bytes: l.tx_bytes,
                })
                .collect();
            let n = name.clone();
            self.mutate(move |s| {
                s.report_links(&n, links)?;
                Ok(((), BTreeSet::new()))
            })
            .await?;
            Ok(pb::ReportAck {
                revision: self.view_rev(&name).await,
            })
        }
        .await;
        self.record("ReportLinkHealth", r).map(Response::new)
    }

    type WatchStream = ViewStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<ViewStream>, Status> {
        let r = self.do_watch(req).await;
        self.record("Watch", r).map(Response::new)
    }
}
