//! Shared test support.
pub mod broker;
pub mod fake_apiserver;
pub mod standalone_agent;
