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

fn cluster_info(s: &State, c: &Cluster, connected: bool) -> pb::ClusterInfo {
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
        links: c
            .links
            .iter()
            .map(|l| pb::LinkHealth {
                peer_cluster: l.peer_cluster.clone(),
                peer_public_key: l.peer_public_key.clone(),
                up: l.up,
                last_handshake_age_ms: l.last_handshake_age_ms,
                rx_bytes: l.rx_bytes,
                tx_bytes: l.tx_bytes,
            })
            .collect(),
    }
}

fn random_hex(bytes: usize) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for _ in 0..bytes {
        let _ = write!(out, "{:02x}", rand::random::<u8>());
    }
    out
}

impl Broker {
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
        self.admin_call("ListTokens", req, async |b: &Self, _| {
            let core = b.core.lock().await;
            Ok(pb::ListTokensResponse {
                tokens: core.state.tokens.values().map(token_info).collect(),
            })
        })
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
                let t = b
                    .mutate(move |s| Ok((s.revoke_token(&r.id)?, BTreeSet::new())))
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
        self.admin_call("ListNetworks", req, async |b: &Self, _| {
            let core = b.core.lock().await;
            Ok(pb::ListNetworksResponse {
                networks: core
                    .state
                    .networks
                    .values()
                    .map(|n| network_info(&core.state, n))
                    .collect(),
            })
        })
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
        self.admin_call("ListClusters", req, async |b: &Self, _| {
            let core = b.core.lock().await;
            Ok(pb::ListClustersResponse {
                clusters: core
                    .state
                    .clusters
                    .values()
                    .map(|c| cluster_info(&core.state, c, b.hub.is_connected(&c.name)))
                    .collect(),
            })
        })
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
                let info = b
                    .mutate({
                        let name = r.name.clone();
                        move |s| {
                            let info = s.clusters.get(&name).map(|c| cluster_info(s, c, false));
                            let (_, affected) = s.remove_cluster(&name)?;
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
