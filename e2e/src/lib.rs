//! l2mesh end-to-end harness: builds multi-cluster topologies out of network
//! namespaces and runs the real binaries in them.
//!
//! Layers, bottom up:
//! - [`netns`]: uniquely named namespaces, veths, bridges, addresses, routes,
//!   commands inside a namespace; `Drop` deletes what was made, even on panic.
//! - [`plan`] (pure) and [`topology`]: a WAN segment with a broker host, and
//!   clusters with a LAN, a gateway on LAN and WAN, further nodes and pod
//!   namespaces.
//! - [`process`]: real binaries inside namespaces, per-process log files,
//!   [`process::Processes::wait_until`] whose timeout error carries every log tail.
//! - [`binaries`]: builds the workspace binaries once per test process.
//! - [`lab::Lab`]: a topology plus its processes and logs, torn down in order.
//! - [`containers`]: the image from `deploy/image`, built once per test
//!   process, and l2mesh run from it as podman containers with the
//!   privileges of the manifests in `deploy/`.
//!
//! Nothing is ever created in the root namespace: every veth has both ends in
//! namespaces of ours, so deleting the namespaces removes every device.

pub mod binaries;
pub mod capture;
pub mod cni;
pub mod containers;
pub mod error;
pub mod lab;
pub mod mesh;
pub mod netns;
pub mod ping;
pub mod plan;
pub mod preflight;
pub mod process;
pub mod registry;
pub mod table;
pub mod topology;

pub use error::{Error, Result};
pub use lab::Lab;
pub use netns::{NameScope, Netns};
pub use plan::{Plan, TopologySpec};
pub use preflight::should_run;
pub use process::{ProcId, ProcSpec, Processes};
pub use topology::Topology;
