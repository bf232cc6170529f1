//! l2mesh broker library: the store, the CA, the view computation and the
//! gRPC services.

pub mod error;
pub mod model;
pub mod state;
pub mod view;

pub use error::{Error, Result};
pub mod grpc_admin;
pub mod grpc_cluster;
pub mod hub;
pub mod limiter;
pub mod metrics;
pub mod pki;
pub mod process;
mod replica;
pub mod server;
pub mod store;

pub use server::{Broker, ServeConfig};
pub mod client;
pub mod conn;
