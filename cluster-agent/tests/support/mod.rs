//! Shared test support.
pub mod broker;
pub mod fake_apiserver;
pub mod k8s_agent;
pub mod rbac;
pub mod standalone_agent;
