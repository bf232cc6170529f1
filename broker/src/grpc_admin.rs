//! The `BrokerAdmin` service: what the admin CLI calls.

use crate::error::Error;
use crate::model::{Cluster, Network, Token};
use crate::server::{Broker, now_unix};
use crate::state::{State, tunnel_subnet};
use base64::Engine as _;
use l2mesh_proto::broker as pb;
use l2mesh_proto::join::JoinString;
use std::collections::BTreeSet;
use tonic::{Request, Response, Status};

fn token_info(t: &Token) -> pb::TokenInfo {
    pb::TokenInfo {
        id: t.id.clone(),
        cluster: t.cluster.clone(),
        created_unix: t.created_unix,
        expires_unix: t.expires_unix,
        uses_total: t.uses_total,
        uses_left: t.uses_left,
        revoked: t.revoked,
    }
}

fn network_info(s: &State, n: &Network) -> pb::NetworkInfo {
    pb::NetworkInfo {
        name: n.name.clone(),
        vni: n.vni,
        mtu: n.mtu,
        cidr: n.cidr.map(|c| c.to_string()).unwrap_or_default(),
        allowed_clusters: n.allowed.iter().cloned().collect(),
        allow_all: n.allow_all,
        members: s.members(&n.name),
        created_unix: n.created_unix,
    }
}

fn cluster_info(
    s: &State,
    c: &Cluster,
    connected: bool,
    links: Vec<pb::LinkHealth>,
) -> pb::ClusterInfo {
    pb::ClusterInfo {
        name: c.name.clone(),
        gateways: c
            .gateways
            .iter()
            .map(|g| pb::Gateway {
                node: g.node.clone(),
                public_key: g.public_key.clone(),
                endpoints: g.endpoints.clone(),
                tunnel_ip: g.tunnel_ip.to_string(),
            })
            .collect(),
        joined_unix: c.joined_unix,
        last_seen_unix: c.last_seen_unix,
        networks: s.networks_of(&c.name),
        tunnel_subnet: tunnel_subnet(c.subnet_index).to_string(),
        connected,
        links,
    }
}

/// Default and largest page of an admin list.
const PAGE_DEFAULT: usize = 100;
const PAGE_MAX: usize = 1000;

/// One page of `items` (sorted by key) after `token`: at most `page_size`
/// entries and, whatever their size, never more than half the message
/// limit (at least one entry, which is bounded by the report limits).
/// Returns the page and the next page token ("" on the last page).
pub fn page<'a, T: 'a, P: prost::Message>(
    items: impl Iterator<Item = (&'a String, &'a T)>,
    token: &str,
    page_size: u32,
    budget: usize,
    mut info: impl FnMut(&T) -> P,
) -> (Vec<P>, String) {
    let size = match usize::try_from(page_size).unwrap_or(PAGE_MAX) {
        0 => PAGE_DEFAULT,
        n => n.min(PAGE_MAX),
    };
    let mut out = Vec::new();
    let mut used = 0;
    let mut last = String::new();
    for (key, item) in items.filter(|(k, _)| token.is_empty() || k.as_str() > token) {
        let entry = info(item);
        let len = entry.encoded_len() + 8;
        if out.len() == size || (!out.is_empty() && used + len > budget) {
            return (out, last);
        }
        used += len;
        last.clone_from(key);
        out.push(entry);
    }
    (out, String::new())
}

/// Half the message limit: room for the framing and then some.
const PAGE_BYTES: usize = l2mesh_proto::limits::MAX_MESSAGE_BYTES / 2;

fn random_hex(bytes: usize) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for _ in 0..bytes {
        let _ = write!(out, "{:02x}", rand::random::<u8>());
    }
    out
}

impl Broker {
    fn links_of(&self, cluster: &str) -> Vec<pb::LinkHealth> {
        self.health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(cluster)
            .cloned()
            .unwrap_or_default()
    }

    async fn admin_call<T, R>(
        &self,
        method: &str,
        req: Request<T>,
        f: impl AsyncFnOnce(&Self, T) -> Result<R, Error>,
    ) -> Result<Response<R>, Status> {
        let r = match self.require_admin(&req).await {
            Ok(()) => f(self, req.into_inner()).await,
            Err(e) => Err(e),
        };
        if let Err(e) = &r {
            tracing::info!(method, error = %e, "admin call failed");
        }
        let r = r.map_err(Status::from);
        self.metrics.call(
            method,
            r.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok),
        );
        r.map(Response::new)
    }
}

#[tonic::async_trait]
impl pb::broker_admin_server::BrokerAdmin for Broker {
    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        self.admin_call(
            "CreateToken",
            req,
            async |b: &Self, r: pb::CreateTokenRequest| {
                let id = format!("tok-{}", random_hex(6));
                let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .encode(rand::random::<[u8; 32]>());
                let ttl = if r.ttl_seconds == 0 {
                    b.config.default_token_ttl.as_secs()
                } else {
                    r.ttl_seconds
                };
                let uses = if r.uses == 0 { 1 } else { r.uses };
                let now = now_unix();
                let token = b
                    .mutate({
                        let secret = secret.clone();
                        move |s| {
                            Ok((
                                s.create_token(&r.cluster, id, &secret, ttl, uses, now)?,
                                BTreeSet::new(),
                            ))
                        }
                    })
                    .await?;
                tracing::info!(token_id = %token.id, cluster = %token.cluster, "token created");
                let join = JoinString {
                    brokers: b.config.advertise.clone(),
                    ca: b.ca_pin(),
                    id: token.id.clone(),
                    secret,
                    cluster: token.cluster.clone(),
                };
                Ok(pb::CreateTokenResponse {
                    token: Some(token_info(&token)),
                    join_string: join.encode(),
                })
            },
        )
        .await
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        self.admin_call(
            "ListTokens",
            req,
            async |b: &Self, r: pb::ListTokensRequest| {
                let core = b.core.lock().await;
                let (tokens, next_page_token) = page(
                    core.state.tokens.iter(),
                    &r.page_token,
                    r.page_size,
                    PAGE_BYTES,
                    token_info,
                );
                Ok(pb::ListTokensResponse {
                    tokens,
                    next_page_token,
                })
            },
        )
        .await
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::TokenInfo>, Status> {
        self.admin_call(
            "RevokeToken",
            req,
            async |b: &Self, r: pb::RevokeTokenRequest| {
                let now = now_unix();
                let t = b
                    .mutate(move |s| Ok((s.revoke_token(&r.id, now)?, BTreeSet::new())))
                    .await?;
                tracing::info!(token_id = %t.id, "token revoked");
                Ok(token_info(&t))
            },
        )
        .await
    }

    async fn create_network(
        &self,
        req: Request<pb::CreateNetworkRequest>,
    ) -> Result<Response<pb::NetworkInfo>, Status> {
        self.admin_call(
            "CreateNetwork",
            req,
            async |b: &Self, r: pb::CreateNetworkRequest| {
                let now = now_unix();
                let n = b
                    .mutate(move |s| {
                        let (n, affected) = s.create_network(
                            &r.name,
                            r.vni,
                            r.mtu,
                            &r.cidr,
                            r.allowed_clusters,
                            r.allow_all,
                            now,
                        )?;
                        Ok((n, affected))
                    })
                    .await?;
                tracing::info!(network = %n.name, vni = n.vni, "network created");
                let core = b.core.lock().await;
                let current = core.state.networks.get(&n.name).unwrap_or(&n);
                Ok(network_info(&core.state, current))
            },
        )
        .await
    }

    async fn list_networks(
        &self,
        req: Request<pb::ListNetworksRequest>,
    ) -> Result<Response<pb::ListNetworksResponse>, Status> {
        self.admin_call(
            "ListNetworks",
            req,
            async |b: &Self, r: pb::ListNetworksRequest| {
                let core = b.core.lock().await;
                let (networks, next_page_token) = page(
                    core.state.networks.iter(),
                    &r.page_token,
                    r.page_size,
                    PAGE_BYTES,
                    |n| network_info(&core.state, n),
                );
                Ok(pb::ListNetworksResponse {
                    networks,
                    next_page_token,
                })
            },
        )
        .await
    }

    async fn delete_network(
        &self,
        req: Request<pb::DeleteNetworkRequest>,
    ) -> Result<Response<pb::NetworkInfo>, Status> {
        self.admin_call(
            "DeleteNetwork",
            req,
            async |b: &Self, r: pb::DeleteNetworkRequest| {
                let (info, n) = b
                    .mutate(move |s| {
                        let info = s.networks.get(&r.name).map(|n| network_info(s, n));
                        let (n, affected) = s.delete_network(&r.name)?;
                        Ok(((info, n), affected))
                    })
                    .await?;
                tracing::info!(network = %n.name, "network deleted");
                Ok(info.unwrap_or_default())
            },
        )
        .await
    }

    async fn list_clusters(
        &self,
        req: Request<pb::ListClustersRequest>,
    ) -> Result<Response<pb::ListClustersResponse>, Status> {
        self.admin_call(
            "ListClusters",
            req,
            async |b: &Self, r: pb::ListClustersRequest| {
                let state = b.current();
                let seen = b.seen.lock().map(|m| m.clone()).unwrap_or_default();
                let (clusters, next_page_token) = page(
                    state.clusters.iter(),
                    &r.page_token,
                    r.page_size,
                    PAGE_BYTES,
                    |c| {
                        let mut info = cluster_info(
                            &state,
                            c,
                            b.hub.is_connected(&c.name),
                            b.links_of(&c.name),
                        );
                        // Calls since the last commit are in memory only.
                        if let Some(at) = seen.get(&c.name) {
                            info.last_seen_unix = info.last_seen_unix.max(*at);
                        }
                        info
                    },
                );
                Ok(pb::ListClustersResponse {
                    clusters,
                    next_page_token,
                })
            },
        )
        .await
    }

    async fn remove_cluster(
        &self,
        req: Request<pb::RemoveClusterRequest>,
    ) -> Result<Response<pb::ClusterInfo>, Status> {
        self.admin_call(
            "RemoveCluster",
            req,
            async |b: &Self, r: pb::RemoveClusterRequest| {
                let now = now_unix();
                let links = b.links_of(&r.name);
                let info = b
                    .mutate({
                        let name = r.name.clone();
                        move |s| {
                            let info = s
                                .clusters
                                .get(&name)
                                .map(|c| cluster_info(s, c, false, links));
                            let (_, affected) = s.remove_cluster(&name, now)?;
                            Ok((info, affected))
                        }
                    })
                    .await?;
                tracing::info!(cluster = %r.name, "cluster removed");
                Ok(info.unwrap_or_default())
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn names(n: usize) -> BTreeMap<String, String> {
        (0..n)
            .map(|i| (format!("c{i:03}"), "x".repeat(i % 7)))
            .collect()
    }

    #[allow(clippy::ptr_arg)] // `page` hands out `&T` with T = String
    fn info(v: &String) -> pb::TokenInfo {
        pb::TokenInfo {
            id: v.as_str().to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn pages_cover_everything_once_by_count() {
        let all = names(25);
        let mut token = String::new();
        let mut seen = Vec::new();
        loop {
            let (page, next) = page(all.iter(), &token, 10, usize::MAX, info);
            assert!(page.len() <= 10);
            seen.extend(page);
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen.len(), 25);
    }

    #[test]
    fn pages_stop_at_the_byte_budget_but_always_make_progress() {
        let all: BTreeMap<String, String> = (0..5)
            .map(|i| (format!("k{i}"), "y".repeat(1000)))
            .collect();
        let (p, next) = page(all.iter(), "", 0, 2500, info);
        assert_eq!(p.len(), 2);
        assert_eq!(next, "k1");
        // An entry over the whole budget still comes, alone.
        let (p, next) = page(all.iter(), "k1", 0, 10, info);
        assert_eq!(p.len(), 1);
        assert_eq!(next, "k2");
        let (p, next) = page(all.iter(), "k3", 0, 10, info);
        assert_eq!((p.len(), next.as_str()), (1, ""));
    }
}
