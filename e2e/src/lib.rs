//! l2mesh end-to-end harness: builds multi-cluster topologies out of network
//! namespaces and runs the real binaries in them.
