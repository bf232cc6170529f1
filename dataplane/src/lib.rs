//! l2mesh dataplane library: the sans-IO switch core and the I/O shell around
//! it (netlink, TAP devices, UDP sockets, boringtun tunnels).
//!
//! - [`wire`]: the inner IPv4/UDP/VXLAN packet codec.
//! - [`switch`]: MAC learning, flooding and split horizon.
//! - [`config`]: validation of the desired state and its diff.
//! - [`engine`]: boringtun tunnels around the switch, still without I/O.

pub mod config;
pub mod engine;
pub mod switch;
pub mod wire;
