//! The gRPC APIs of l2mesh, generated from `proto/*.proto`.
//!
//! - [`broker`]: what cluster agents and the admin CLI say to the broker.
//! - [`view`]: the cluster view as the broker's watch stream builds it
//!   (snapshots and deltas).
//! - [`node`]: desired dataplane state and node status between the cluster
//!   agent, the per-node dataplane, the CLI and the CNI plugin.
//! - [`etcd`]: the subset of etcd's API the broker's etcd store speaks.
//!
//! Messages that carry secrets (token secrets, join strings) redact them in
//! their `Debug` output.

#![allow(missing_docs, clippy::doc_markdown)]

use std::fmt;

pub mod join;
pub mod limits;
pub mod pinned;
pub mod view;

/// `l2mesh.broker.v1`: onboarding, reports, the cluster view and admin calls.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod broker {
    tonic::include_proto!("l2mesh.broker.v1");
}

/// `l2mesh.node.v1`: the per-node dataplane API and the agent's node sync.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod node {
    tonic::include_proto!("l2mesh.node.v1");
}

/// `etcdserverpb`: the part of etcd's v3 API (ranges, transactions,
/// watches) that the broker's etcd store uses, client side only.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// Prefix of the TAP device the dataplane puts on each network's bridge: a
/// bridge port with this prefix is the dataplane's own, never a pod's.
pub const DATAPLANE_TAP_PREFIX: &str = "l2mt-";

/// Shown in place of a secret in `Debug` output.
pub const REDACTED: &str = "<redacted>";

fn redact(secret: &str) -> &'static str {
    if secret.is_empty() { "" } else { REDACTED }
}

impl fmt::Debug for broker::JoinRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinRequest")
            .field("token_id", &self.token_id)
            .field("token_secret", &redact(&self.token_secret))
            .field("cluster_name", &self.cluster_name)
            .field("csr_pem", &format_args!("<{} bytes>", self.csr_pem.len()))
            .finish()
    }
}

impl fmt::Debug for broker::CreateTokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateTokenResponse")
            .field("token", &self.token)
            .field("join_string", &redact(&self.join_string))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::broker::{ClusterView, CreateTokenResponse, JoinRequest, PeerGateway, ViewNetwork};
    use super::node::{DesiredState, NetworkSpec, NodeIdentity, PeerGroup, PeerSpec};
    use prost::Message;

    #[test]
    fn desired_state_round_trips_through_the_wire_encoding() {
        let state = DesiredState {
            revision: 7,
            identity: Some(NodeIdentity {
                node_name: "node-a".into(),
                tunnel_ip: "100.64.0.1".into(),
                listen_port: 51820,
            }),
            networks: vec![NetworkSpec {
                name: "blue".into(),
                vni: 4097,
                mtu: 1390,
                pod_cidr: "10.1.0.0/24".into(),
            }],
            peers: vec![PeerSpec {
                public_key: vec![7; 32],
                endpoint: "192.0.2.1:51820".into(),
                tunnel_ip: "100.64.0.2".into(),
                vnis: vec![4097],
                group: PeerGroup::Remote.into(),
                persistent_keepalive: 25,
                name: "gw-b".into(),
            }],
        };
        let bytes = state.encode_to_vec();
        let decoded = DesiredState::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded, state);
        assert_eq!(decoded.peers[0].group(), PeerGroup::Remote);
    }

    #[test]
    fn cluster_view_round_trips() {
        let view = ClusterView {
            revision: 3,
            cluster_name: "edge-1".into(),
            tunnel_subnet: "100.64.1.0/24".into(),
            networks: vec![ViewNetwork {
                name: "blue".into(),
                vni: 10,
                mtu: 1390,
                cidr: "10.10.0.0/16".into(),
                cluster_cidr: "10.10.1.0/24".into(),
                peers: vec![PeerGateway {
                    cluster: "cloud".into(),
                    node: "gw".into(),
                    public_key: vec![1; 32],
                    endpoints: vec!["198.51.100.1:51820".into()],
                    tunnel_ip: "100.64.2.1".into(),
                }],
                members: vec!["edge-1".into(), "cloud".into()],
            }],
            admissions: vec![],
            delta: None,
        };
        let decoded = ClusterView::decode(view.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, view);
    }

    #[test]
    fn truncated_bytes_are_a_decode_error_not_a_panic() {
        let view = ClusterView {
            revision: 1,
            cluster_name: "x".repeat(40),
            ..Default::default()
        };
        let bytes = view.encode_to_vec();
        assert!(ClusterView::decode(&bytes[..bytes.len() - 3]).is_err());
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let join = JoinRequest {
            token_id: "tok-1".into(),
            token_secret: "s3cr3t-value".into(),
            cluster_name: "edge".into(),
            csr_pem: "-----BEGIN CERTIFICATE REQUEST-----".into(),
        };
        let printed = format!("{join:?}");
        assert!(!printed.contains("s3cr3t-value"), "{printed}");
        assert!(printed.contains("tok-1"));
        assert!(printed.contains(super::REDACTED));

        let created = CreateTokenResponse {
            token: None,
            join_string: "l2m1.secret-join".into(),
        };
        let printed = format!("{created:?}");
        assert!(!printed.contains("secret-join"), "{printed}");
    }
}
