//! l2mesh dataplane library: the sans-IO switch core and the I/O shell around
//! it (netlink, TAP devices, UDP sockets, boringtun tunnels).
