//! Connect stream framing: 1 flag byte, 4-byte big-endian length, payload.

use bytes::{Buf, Bytes, BytesMut};

use super::error::ConnectError;

/// Flag bit: the payload is compressed (we never negotiate compression).
pub const FLAG_COMPRESSED: u8 = 0x01;
/// Flag bit: the end-of-stream message.
pub const FLAG_END_STREAM: u8 = 0x02;

/// Largest message we accept in one envelope.
pub const MAX_MESSAGE: usize = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub flags: u8,
    pub payload: Bytes,
}

/// Frame one message.
pub fn encode(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + payload.len());
    out.extend_from_slice(&[flags]);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.freeze()
}

/// Incremental decoder: push bytes as they arrive, pop whole envelopes.
#[derive(Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete envelope, `Ok(None)` if more bytes are needed.
    pub fn next_envelope(&mut self) -> Result<Option<Envelope>, ConnectError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let flags = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if flags & FLAG_COMPRESSED != 0 {
            return Err(ConnectError::unimplemented(
                "compressed envelopes are not supported (send Connect-Content-Encoding: identity)",
            ));
        }
        if flags & !(FLAG_COMPRESSED | FLAG_END_STREAM) != 0 {
            return Err(ConnectError::invalid_argument(format!(
                "unknown envelope flags {flags:#04x}"
            )));
        }
        if len > MAX_MESSAGE {
            return Err(ConnectError::new(
                super::Code::ResourceExhausted,
                format!("message of {len} bytes exceeds the limit of {MAX_MESSAGE}"),
            ));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        let payload = self.buf.split_to(len).freeze();
        Ok(Some(Envelope { flags, payload }))
    }

    /// Call at end of input: trailing bytes are a truncated envelope.
    pub fn finish(&self) -> Result<(), ConnectError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ConnectError::invalid_argument(format!(
                "stream ended inside an envelope ({} stray bytes)",
                self.buf.len()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_envelopes_split_anywhere() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&encode(0, b"{\"a\":1}"));
        wire.extend_from_slice(&encode(FLAG_END_STREAM, b"{}"));
        for split in 0..wire.len() {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for part in [&wire[..split], &wire[split..]] {
                d.push(part);
                while let Some(e) = d.next_envelope().unwrap() {
                    got.push(e);
                }
            }
            d.finish().unwrap();
            assert_eq!(got.len(), 2, "split at {split}");
            assert_eq!(&got[0].payload[..], b"{\"a\":1}");
            assert_eq!(got[1].flags, FLAG_END_STREAM);
        }
    }

    #[test]
    fn rejects_bad_frames() {
        let mut d = Decoder::default();
        d.push(&encode(FLAG_COMPRESSED, b"x"));
        assert_eq!(
            d.next_envelope().unwrap_err().code,
            super::super::Code::Unimplemented
        );

        let mut d = Decoder::default();
        d.push(&[0x80, 0, 0, 0, 0]);
        assert_eq!(
            d.next_envelope().unwrap_err().code,
            super::super::Code::InvalidArgument
        );

        let mut d = Decoder::default();
        d.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            d.next_envelope().unwrap_err().code,
            super::super::Code::ResourceExhausted
        );

        let mut d = Decoder::default();
        d.push(&[0, 0, 0, 0, 9, b'x']);
        assert_eq!(d.next_envelope().unwrap(), None);
        assert!(d.finish().is_err());
    }
}
