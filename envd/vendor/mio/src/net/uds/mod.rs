#[cfg(not(target_os = "emscripten"))]
mod datagram;
#[cfg(not(target_os = "emscripten"))]
pub use self::datagram::UnixDatagram;

mod listener;
pub use self::listener::UnixListener;

mod stream;
pub use self::stream::UnixStream;
