//! l2mesh cluster agent library: onboarding, intent sources (Kubernetes or a
//! manifest directory), desired node state, node sync and the CNI plugin.
//!
//! Layout, pure first:
//! - [`crd`]: the `L2Network` resource and its validation.
//! - [`ipam`]: allocators (local VNIs, node tunnel IPs, pod CIDR slices, pod addresses).
//! - [`desired`]: desired dataplane state of every node from nodes, hellos,
//!   L2Networks and the broker view (split-horizon peer groups).
//! - [`status`]: L2Network status conditions and link health.
//! - [`manifests`]: standalone intent (YAML directory).
//! - [`engine`]: shared state and the reconcile step both modes run.
//! - edges: [`identity`] (join, stored identity), [`tls`] (pinned broker CA,
//!   node-sync PKI), [`broker_link`], [`nodesync`], [`standalone`], [`k8s`],
//!   [`metrics`], [`cni`] (the `l2mesh-cni` plugin), [`cni_install`], [`uds`].

pub mod broker_link;
pub mod cni;
pub mod cni_install;
pub mod crd;
pub mod desired;
pub mod engine;
pub mod identity;
pub mod ipam;
pub mod k8s;
pub mod manifests;
pub mod metrics;
pub mod nodesync;
pub mod standalone;
pub mod status;
pub mod tls;
pub mod uds;
pub mod uninstall;
