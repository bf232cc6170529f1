//! `l2mesh-cni`: the CNI plugin (spec 1.0) that Multus calls.

use std::process::ExitCode;

fn main() -> ExitCode {
    // CNI plugins report errors as a JSON result on stdout (spec 1.0, code 4:
    // "invalid necessary environment variables" is the nearest; we use 999,
    // the range reserved for plugin-specific errors).
    println!(
        "{{\"cniVersion\":\"1.0.0\",\"code\":999,\"msg\":\"l2mesh-cni is not built yet\",\"details\":\"no interface was created\"}}"
    );
    ExitCode::from(1)
}
