//! The host side of the hybrid vsock: unix sockets (see [`muxer`]).

pub mod muxer;

pub use muxer::VsockMuxer;
