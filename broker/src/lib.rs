//! l2mesh broker library: the store, the CA, the view computation and the
//! gRPC services.

pub mod error;
pub mod model;
pub mod state;
pub mod view;

pub use error::{Error, Result};
pub mod pki;
pub mod store;
