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
    /// Print the CustomResourceDefinitions as YAML (what deploy/crds/ holds).
    Crd,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd => l2mesh_cluster_agent::crd::crds_yaml()
            .map(|text| print!("{text}"))
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("l2mesh-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
