//! `l2mesh-broker`: the central service and its admin CLI.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// The l2mesh broker: holds clusters, networks, onboarding tokens and the CA,
/// and streams to each cluster agent the view it needs.
#[derive(Debug, Parser)]
#[command(name = "l2mesh-broker", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker (gRPC over TLS, state in an embedded store).
    Serve {
        /// Directory holding the store, the CA and the admin credential.
        #[arg(
            long,
            env = "L2MESH_DATA_DIR",
            default_value = "/var/lib/l2mesh-broker"
        )]
        data_dir: std::path::PathBuf,
        /// Address the gRPC API listens on.
        #[arg(long, env = "L2MESH_LISTEN", default_value = "0.0.0.0:7443")]
        listen: std::net::SocketAddr,
    },
    /// Manage onboarding tokens (talks to a running broker).
    Token,
    /// Manage multi-cluster networks (talks to a running broker).
    Network,
    /// List or remove clusters (talks to a running broker).
    Cluster,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    eprintln!(
        "l2mesh-broker: {:?} is not built yet; nothing was done",
        cli.command
    );
    ExitCode::from(2)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
