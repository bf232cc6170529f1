//! Shared test support.
pub mod fake_apiserver;
pub mod standalone_agent;
