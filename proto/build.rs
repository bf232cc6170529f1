//! Compiles the `.proto` files with protox (a pure-Rust protobuf compiler), so
//! a fresh machine builds this crate without `protoc`.

use std::error::Error;

const PROTOS: &[&str] = &["broker.proto", "node.proto"];
const ETCD_PROTO: &str = "etcd.proto";

/// Messages that carry secrets: their `Debug` is written by hand in `lib.rs`
/// so that the secrets never reach a log.
const SECRET_CARRIERS: &[&str] = &[
    ".l2mesh.broker.v1.JoinRequest",
    ".l2mesh.broker.v1.CreateTokenResponse",
];

fn main() -> Result<(), Box<dyn Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed=proto/{proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let mut config = tonic_prost_build::Config::new();
    config.skip_debug(SECRET_CARRIERS);
    tonic_prost_build::configure().compile_fds_with_config(descriptors, config)?;
    // The subset of etcd's API the broker's etcd store speaks: client only.
    println!("cargo:rerun-if-changed=proto/{ETCD_PROTO}");
    let etcd = protox::compile([ETCD_PROTO], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(etcd)?;
    Ok(())
}
