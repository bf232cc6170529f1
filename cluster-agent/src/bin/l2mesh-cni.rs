//! `l2mesh-cni`: the CNI plugin (spec 1.0) that Multus calls.

use l2mesh_cluster_agent::cni::{self, types::CniEnv, types::CniError, types::code};
use std::io::Read;
use std::process::ExitCode;

fn main() -> ExitCode {
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
