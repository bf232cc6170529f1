//! l2mesh dataplane library: the sans-IO switch core and the I/O shell around
//! it (netlink, TAP devices, UDP sockets, boringtun tunnels).
//!
//! - [`wire`]: the inner IPv4/UDP/VXLAN packet codec.
//! - [`switch`]: MAC learning, flooding and split horizon.
//! - [`config`]: validation of the desired state and its diff.
//! - [`engine`]: boringtun tunnels around the switch, still without I/O.
//! - [`offload`]: TAP virtio-net headers and TCP segmentation (TSO in software).

pub mod api;
pub mod client;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod file;
pub mod keys;
pub mod metrics;
pub mod netdev;
pub mod nft;
pub mod offload;
pub mod port;
pub mod reassembly;
pub mod status_json;
pub mod switch;
pub mod sync;
pub mod udp;
pub mod wire;

/// Errors of the dataplane library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid desired state: {0}")]
    Config(#[from] config::ConfigError),
    #[error("netlink: {0}")]
    Netlink(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("no network named {0:?} on this node; apply a desired state that contains it first")]
    NoSuchNetwork(String),
    #[error("no interface named {0:?}; create it (e.g. the pod veth) before attaching it")]
    NoSuchInterface(String),
    #[error("interface {ifname:?} is not attached to bridge {bridge:?} of network {network:?}")]
    NotAttached {
        ifname: String,
        network: String,
        bridge: String,
    },
    #[error("interface {0:?} is a device the dataplane owns; attach pod interfaces only")]
    OwnedInterface(String),
    #[error("keeping the node out of tenant networks: {0}")]
    Isolation(String),
    #[error("interface {ifname:?} cannot be attached: {reason}")]
    RefusedInterface { ifname: String, reason: String },
    #[error("invalid pod in attach request: {0}")]
    InvalidPod(String),
    #[error("key file {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("state file {path}: {reason}")]
    State { path: String, reason: String },
    /// A step of an apply failed; `outcome` says whether the partial change
    /// was undone and what to do.
    #[error("could not apply the desired state: {step} failed: {source}; {outcome}")]
    Apply {
        step: String,
        #[source]
        source: Box<Error>,
        outcome: String,
    },
}
