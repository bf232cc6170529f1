//! The harness's error type.

use std::path::PathBuf;

/// Everything the harness can fail with. Messages say what went wrong and,
/// where it helps, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A helper program could not be started at all.
    #[error("could not start `{command}`: {source} (is it installed and on PATH?)")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// A helper program ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    /// A name given to the harness cannot be used.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    /// A topology specification the harness cannot build.
    #[error("invalid topology: {0}")]
    Spec(String),
    /// A `wait_until` condition did not hold in time; the message carries
    /// the description and every process's log tail.
    #[error("{0}")]
    Timeout(String),
    /// A daemon process exited while the test waited on a condition; the
    /// message carries every process's state and log tail.
    #[error("{0}")]
    ProcessDied(String),
    /// A network expectation failed (e.g. isolation); the message carries
    /// every process's state and log tail.
    #[error("{0}")]
    Check(String),
    /// A file or directory operation failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `cargo build` of the workspace binaries failed.
    #[error("building the workspace binaries failed: {0}")]
    Build(String),
    /// A failure that happened once and is shared with every later caller
    /// (the one workspace build of a test process).
    #[error("{0}")]
    Earlier(String),
    /// A binary the test asked for is not part of the build.
    #[error("binary `{name}` not found: {hint}")]
    BinaryNotFound { name: String, hint: String },
    /// Everything was torn down (Ctrl-C); nothing new may be created.
    #[error("the harness is shutting down (interrupted); nothing new is created")]
    ShuttingDown,
    /// A process handle that this process group never issued.
    #[error("unknown process #{0}")]
    UnknownProcess(usize),
}

/// Result with the harness's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
