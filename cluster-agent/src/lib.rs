//! l2mesh cluster agent library: onboarding, intent sources (Kubernetes or a
//! manifest directory), desired node state, node sync and the CNI plugin.

pub mod cni;
pub mod crd;
pub mod desired;
pub mod ipam;
pub mod uds;
