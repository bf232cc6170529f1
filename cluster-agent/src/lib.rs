//! l2mesh cluster agent library: onboarding, intent sources (Kubernetes or a
//! manifest directory), desired node state, node sync and the CNI plugin.

pub mod broker_link;
pub mod cni;
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
