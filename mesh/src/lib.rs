//! Cluster membership and node-to-node transport.
//!
//! Nodes find each other by scuttlebutt gossip ([`membership`], chitchat
//! over UDP) and exchange the rkyv messages of `schema::mesh` over QUIC
//! ([`transport`], quinn with mutual TLS under a cluster CA, [`tls`]). This
//! crate knows nothing of VMs: the node decides what a request means and
//! where a raw stream goes.

pub mod membership;
pub mod tls;
pub mod transport;

pub use membership::{Member, Membership, MembershipConfig, MembershipError};
pub use schema::mesh::{NodeInfo, NodeState, Request, Response, StreamHeader};
pub use tls::{ClusterCa, NodeIdentity, TlsError, TrustRoot};
pub use transport::{Handler, IncomingStream, Peer, Transport, TransportConfig, TransportError};
