//! The broker's error type and its mapping to gRPC status codes.

/// Everything that can go wrong in the broker library. Messages name what is
/// wrong and, where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; nothing was changed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A name or number is already taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// The caller is known but may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The caller could not be identified (no, unknown or revoked credential).
    #[error("{0}")]
    Unauthenticated(String),
    /// A pool (VNIs, subnets, slices) or a rate limit is exhausted.
    #[error("{0}")]
    Exhausted(String),
    /// Another process holds the store's lock (a second broker on one data dir).
    #[error(
        "the store {0} is locked by another l2mesh-broker: stop that broker, or give this one its own --data-dir"
    )]
    StoreInUse(String),
    /// The persistent store failed; nothing was acknowledged.
    #[error("store failure: {0}")]
    Store(#[from] sled::Error),
    /// A write could not be made durable; it was not applied.
    #[error("the broker could not save this change, nothing was changed: {0}")]
    Persist(String),
    /// The shared store (etcd) cannot take writes now; nothing was changed.
    #[error("{0}")]
    StoreUnavailable(String),
    /// Another broker replica wrote first: nothing was written; reload the
    /// state and apply the change again (handled inside the broker).
    #[error("another broker replica changed the store first: retry")]
    Conflict,
    /// A stored record could not be decoded.
    #[error("corrupt stored record {key}: {reason}")]
    Corrupt { key: String, reason: String },
    /// Certificate generation or parsing failed.
    #[error("certificate error: {0}")]
    Pki(String),
    /// File I/O in the data directory failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// TLS setup or a connection failed (client side).
    #[error("connection error: {0}")]
    Transport(String),
    /// A gRPC call returned an error (client side).
    #[error("broker said: {0}")]
    Rpc(Box<tonic::Status>),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<rcgen::Error> for Error {
    fn from(e: rcgen::Error) -> Self {
        Self::Pki(e.to_string())
    }
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Self::Rpc(Box::new(s))
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Status;
        match e {
            Error::InvalidArgument(m) => Status::invalid_argument(m),
            Error::NotFound(m) => Status::not_found(m),
            Error::AlreadyExists(m) => Status::already_exists(m),
            Error::PermissionDenied(m) => Status::permission_denied(m),
            Error::Unauthenticated(m) => Status::unauthenticated(m),
            Error::Exhausted(m) => Status::resource_exhausted(m),
            Error::StoreUnavailable(m) => Status::unavailable(m),
            Error::Conflict => Status::aborted(Error::Conflict.to_string()),
            Error::Rpc(s) => *s,
            other => Status::internal(other.to_string()),
        }
    }
}

/// Result with the broker [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
