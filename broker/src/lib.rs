//! l2mesh broker library: the store, the CA, the view computation and the
//! gRPC services.
