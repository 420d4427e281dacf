//! Cluster membership and node-to-node transport.
//!
//! Nodes find each other by scuttlebutt gossip (chitchat over UDP) and
//! exchange rkyv messages from `schema` over QUIC (quinn, mutual TLS with a
//! cluster CA). This crate knows nothing of VMs. It is filled by the mesh
//! issue; until then a node runs alone and this crate has no code.
