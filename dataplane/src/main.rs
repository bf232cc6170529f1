//! `l2mesh-dataplane`: the per-node daemon and its status CLI.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// The l2mesh node dataplane: Linux bridges and TAPs per network, WireGuard
/// tunnels (boringtun) to peers, and the MAC-learning switch between them.
#[derive(Debug, Parser)]
#[command(name = "l2mesh-dataplane", version, about, long_about = None)]
struct Cli {
    /// Unix socket of the local control API.
    #[arg(
        long,
        global = true,
        env = "L2MESH_DATAPLANE_SOCKET",
        default_value = "/run/l2mesh/dataplane.sock"
    )]
    socket: std::path::PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon.
    Run,
    /// Print peers and networks of a running daemon as tables.
    Status,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    eprintln!(
        "l2mesh-dataplane: {:?} is not built yet; nothing was done",
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
