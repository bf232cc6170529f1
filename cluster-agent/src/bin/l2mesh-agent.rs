//! `l2mesh-agent`: one per cluster.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// The l2mesh cluster agent: joins the broker with an onboarding token, reads
/// L2Network intent (Kubernetes or a manifest directory) and serves each
/// node's desired dataplane state.
#[derive(Debug, Parser)]
#[command(name = "l2mesh-agent", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run as a Kubernetes controller.
    Kubernetes,
    /// Run on hosts without Kubernetes, reading manifests from a directory.
    Standalone {
        /// Directory of L2Network manifests and the node list.
        #[arg(long, env = "L2MESH_MANIFESTS")]
        manifests: std::path::PathBuf,
        /// Directory where the agent keeps its identity.
        #[arg(long, env = "L2MESH_STATE_DIR")]
        state_dir: std::path::PathBuf,
    },
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    eprintln!(
        "l2mesh-agent: {:?} is not built yet; nothing was done",
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
