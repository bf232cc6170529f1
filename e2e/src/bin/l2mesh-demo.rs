//! `l2mesh-demo`: a local three-cluster demo on network namespaces.

use clap::Parser;
use std::process::ExitCode;

/// Build a three-cluster l2mesh topology out of network namespaces on this
/// machine, show who is connected to whom, ping across clusters and clean up.
#[derive(Debug, Parser)]
#[command(name = "l2mesh-demo", version, about, long_about = None)]
struct Cli {
    /// Leave the topology up on exit, with instructions for poking at it.
    #[arg(long, env = "L2MESH_DEMO_KEEP")]
    keep: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    eprintln!(
        "l2mesh-demo: the demo is not built yet (keep={}); nothing was done",
        cli.keep
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
