//! `l2mesh-cni`: the CNI plugin (spec 1.0) that Multus calls, with
//! `CNI_COMMAND` set. Without it, `l2mesh-cni install` copies the plugin
//! into the host's CNI bin directory (the dataplane Pod's init container).

use l2mesh_cluster_agent::cni::{self, types::CniEnv, types::CniError, types::code};
use std::io::Read;
use std::process::ExitCode;

/// Commands for a person or an init container; the runtime sets
/// `CNI_COMMAND` instead.
#[derive(Debug, clap::Parser)]
#[command(
    name = "l2mesh-cni",
    version = l2mesh_telemetry::VERSION,
    about = "The l2mesh CNI plugin. The container runtime (Multus) calls it with CNI_COMMAND set; \
             without it, `install` copies it onto a host."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Copy this executable into the host's CNI bin directory as
    /// `l2mesh-cni`, atomically (temporary name, then rename), so a runtime
    /// executing the old one is never disturbed.
    Install {
        /// The host's CNI bin directory as mounted in this container.
        #[arg(long, env = "L2MESH_CNI_BIN_DIR", default_value = "/host/opt/cni/bin")]
        bin_dir: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_none() {
        use clap::Parser as _;
        let Command::Install { bin_dir } = Cli::parse().command;
        return match l2mesh_cluster_agent::cni_install::install_self(&bin_dir) {
            Ok(path) => {
                println!("installed {}", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("l2mesh-cni install: {e}");
                ExitCode::FAILURE
            }
        };
    }
    // Logs go to stderr only; stdout is the CNI result.
    l2mesh_telemetry::init_logs("L2MESH_CNI_LOG", "warn");
    let env = CniEnv::from_lookup(|k| std::env::var(k).ok());
    let mut stdin = Vec::new();
    if env.command != "VERSION"
        && let Err(e) = std::io::stdin().read_to_end(&mut stdin)
    {
        return fail(&CniError::new(
            code::IO_FAILURE,
            format!("cannot read stdin: {e}"),
            "",
        ));
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&CniError::new(code::IO_FAILURE, e.to_string(), "")),
    };
    match runtime.block_on(cni::run(&env, &stdin)) {
        Ok(Some(json)) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &CniError) -> ExitCode {
    println!(
        "{}",
        serde_json::to_string(e)
            .unwrap_or_else(|_| format!("{{\"code\":{},\"msg\":\"error\"}}", e.code))
    );
    ExitCode::FAILURE
}
