//! The VMM control protocol: what the node (or an operator) asks a running
//! `sandmesh vmm` process over its control unix socket.
//!
//! One request, one response, on a stream; any number in a row. A frame is
//! a u32 big-endian length and that many bytes of JSON, at most
//! [`MAX_FRAME`]. Every message carries the sender's [`PROTOCOL_VERSION`];
//! a VMM answers a request of another version with
//! [`Response::Error`] naming both versions (checked before the request
//! itself is decoded, so a newer request shape still gets that answer).

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// The version of this protocol. `Snapshot` was added without a bump: a
/// variant added to both enums breaks no existing message (an older VMM
/// answers it with a decode error, an older client never sends it).
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest frame body.
pub const MAX_FRAME: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    GetState,
    Pause,
    Resume,
    Shutdown,
    /// Pause the vCPUs (if running), write a snapshot into `dir` (an
    /// absolute path; created if missing; a previous snapshot there is
    /// replaced atomically), then resume them if `resume` is set, else
    /// leave the VM paused. A VM that was paused before stays paused.
    Snapshot {
        dir: String,
        kind: SnapshotKind,
        #[serde(default)]
        resume: bool,
    },
}

/// Whether a snapshot writes all of guest memory or only what changed
/// since the VM's base snapshot (the one it was restored from or last
/// snapshotted to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    Full,
    Diff,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Paused,
    ShuttingDown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    State {
        state: VmState,
        vcpus: u8,
        memory_mib: u64,
        uptime_ms: u64,
    },
    Ok,
    /// A snapshot was written.
    Snapshot {
        dir: String,
        kind: SnapshotKind,
        /// The memory file's name inside `dir`.
        memory_file: String,
        /// Pages in a diff's memory file (0 for a full snapshot).
        dirty_pages: u64,
        /// Size of the guest memory the snapshot covers.
        memory_bytes: u64,
        duration_us: u64,
        /// Whether the VM is paused now.
        paused: bool,
    },
    Error {
        message: String,
    },
}

/// A request on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestFrame {
    pub version: u32,
    pub request: Request,
}

/// A response on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseFrame {
    pub version: u32,
    pub response: Response,
}

impl RequestFrame {
    pub fn new(request: Request) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            request,
        }
    }
}

impl ResponseFrame {
    pub fn new(response: Response) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            response,
        }
    }
}

/// Errors reading a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the stream closed")]
    Closed,
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(u32),
    #[error("malformed message: {0}")]
    Json(String),
    #[error("unsupported control protocol version {got} (this side speaks {PROTOCOL_VERSION})")]
    Version { got: u32 },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Write `msg` as one frame.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    if body.len() > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("frame of {} bytes exceeds {MAX_FRAME}", body.len()),
        ));
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)?;
    w.flush()
}

/// Read one frame's body (the length checked before anything is
/// allocated). A clean end of stream before a frame is [`FrameError::Closed`].
pub fn read_frame_body<R: Read>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(len);
    if len as usize > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    Ok(body)
}

#[derive(Deserialize)]
struct VersionOnly {
    version: u32,
}

/// Decode a frame body: the version first, then the message.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let v: VersionOnly =
        serde_json::from_slice(body).map_err(|e| FrameError::Json(e.to_string()))?;
    if v.version != PROTOCOL_VERSION {
        return Err(FrameError::Version { got: v.version });
    }
    serde_json::from_slice(body).map_err(|e| FrameError::Json(e.to_string()))
}

/// Read and decode one frame.
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    decode(&read_frame_body(r)?)
}

/// Client side: send `request`, read the response.
pub fn call<S: Read + Write>(stream: &mut S, request: Request) -> Result<Response, FrameError> {
    write_frame(stream, &RequestFrame::new(request))?;
    let frame: ResponseFrame = read_frame(stream)?;
    Ok(frame.response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        for req in [
            Request::GetState,
            Request::Pause,
            Request::Resume,
            Request::Shutdown,
            Request::Snapshot {
                dir: "/snap/a".into(),
                kind: SnapshotKind::Diff,
                resume: true,
            },
        ] {
            let mut buf = Vec::new();
            write_frame(&mut buf, &RequestFrame::new(req.clone())).unwrap();
            assert_eq!(
                u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize,
                buf.len() - 4
            );
            let back: RequestFrame = read_frame(&mut &buf[..]).unwrap();
            assert_eq!(back.request, req);
        }
        let resp = Response::State {
            state: VmState::Paused,
            vcpus: 2,
            memory_mib: 256,
            uptime_ms: 5,
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &ResponseFrame::new(resp.clone())).unwrap();
        let text = std::str::from_utf8(&buf[4..]).unwrap();
        assert!(
            text.contains(r#""type":"state""#) && text.contains(r#""state":"paused""#),
            "{text}"
        );
        let back: ResponseFrame = read_frame(&mut &buf[..]).unwrap();
        assert_eq!(back.response, resp);
    }

    #[test]
    fn oversize_garbage_version_and_truncation_are_errors() {
        let mut big = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        big.extend_from_slice(b"{}");
        assert!(matches!(
            read_frame::<_, RequestFrame>(&mut &big[..]),
            Err(FrameError::TooLarge(_))
        ));
        let mut garbage = 5u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"\xff\x00abc");
        assert!(matches!(
            read_frame::<_, RequestFrame>(&mut &garbage[..]),
            Err(FrameError::Json(_))
        ));
        let mut unknown = Vec::new();
        write_frame(
            &mut unknown,
            &serde_json::json!({"version": 1, "request": {"type": "explode"}}),
        )
        .unwrap();
        assert!(matches!(
            read_frame::<_, RequestFrame>(&mut &unknown[..]),
            Err(FrameError::Json(_))
        ));
        let mut v2 = Vec::new();
        write_frame(
            &mut v2,
            &serde_json::json!({"version": 2, "request": {"type": "new_thing"}}),
        )
        .unwrap();
        let err = read_frame::<_, RequestFrame>(&mut &v2[..]).unwrap_err();
        assert!(matches!(err, FrameError::Version { got: 2 }), "{err}");
        assert!(matches!(
            read_frame::<_, RequestFrame>(&mut &b""[..]),
            Err(FrameError::Closed)
        ));
        assert!(matches!(
            read_frame::<_, RequestFrame>(&mut &[0u8, 0][..]),
            Err(FrameError::Io(_))
        ));
        let mut short = 10u32.to_be_bytes().to_vec();
        short.extend_from_slice(b"{}");
        assert!(matches!(
            read_frame::<_, RequestFrame>(&mut &short[..]),
            Err(FrameError::Io(_))
        ));
    }
}
