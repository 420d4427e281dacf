//! Mesh frames as a peer may send them: a stream of u32-length-prefixed
//! bodies with any header, version, kind and archive bytes. Each body goes
//! through the receiver's checks for every message type; nothing may panic,
//! and whatever decodes must re-encode to a frame that decodes the same.
//!
//! Random bytes rarely get past rkyv's validation, so the input is also
//! used to build valid frames (a REST call with the input as its fields)
//! and then to corrupt them (a byte overwritten, the tail cut), which
//! reaches the archive checks deep inside.
#![no_main]

use libfuzzer_sys::fuzz_target;
use schema::mesh::{
    self, ClusterCall, ClusterReply, FrameHeader, Header, Message, Request, Response, RestRequest,
    SessionHeader, StreamHeader, StreamReply,
};

fn check<M: Message + PartialEq + std::fmt::Debug>(body: &[u8]) {
    if let Ok(m) = mesh::decode_body::<M>(body) {
        let frame = m.encode().expect("a decoded message re-encodes");
        let again = mesh::decode_body::<M>(&frame[4..]).expect("a re-encoded message decodes");
        assert_eq!(m, again);
    }
}

fn all(body: &[u8]) {
    let _ = FrameHeader::parse(body);
    check::<Request>(body);
    check::<Response>(body);
    check::<StreamHeader>(body);
    check::<StreamReply>(body);
    check::<SessionHeader>(body);
    // A remote actor payload (ractor_cluster's argument bytes): the same
    // bytecheck validation, never a panic.
    let _ = mesh::decode_actor_payload::<ClusterCall>(body);
    let _ = mesh::decode_actor_payload::<ClusterReply>(body);
}

fuzz_target!(|data: &[u8]| {
    // As a stream of frames.
    let mut rest = data;
    while rest.len() >= 4 {
        let Ok(len) = mesh::body_len([rest[0], rest[1], rest[2], rest[3]]) else {
            break;
        };
        let body = &rest[4..];
        let body = &body[..len.min(body.len())];
        all(body);
        rest = &rest[4 + body.len()..];
    }

    // As the fields of a valid frame, then corrupted.
    if data.len() < 3 {
        return;
    }
    let (ctl, payload) = data.split_at(3);
    let split = payload.len() / 2;
    let request = Request::Rest(RestRequest {
        method: String::from_utf8_lossy(&payload[..split.min(8)]).into_owned(),
        path: String::from_utf8_lossy(&payload[..split]).into_owned(),
        query: String::new(),
        headers: vec![Header {
            name: "x".into(),
            value: payload[split..].to_vec(),
        }],
        body: payload.to_vec(),
    });
    let Ok(mut frame) = request.encode() else {
        return;
    };
    let at = 4 + usize::from(u16::from_le_bytes([ctl[0], ctl[1]])) % (frame.len() - 4);
    frame[at] = ctl[2];
    let cut = frame.len() - usize::from(ctl[1] & 7).min(frame.len() - 4);
    all(&frame[4..cut]);

    // A valid remote actor call with the input as its template, corrupted.
    let call = ClusterCall::Reserve {
        template: String::from_utf8_lossy(payload).into_owned(),
        memory_mib: u64::from(ctl[0]),
    };
    if let Ok(mut bytes) = mesh::encode_actor_payload(&call) {
        let at = usize::from(u16::from_le_bytes([ctl[0], ctl[1]])) % bytes.len();
        bytes[at] = ctl[2];
        if let Ok(back) = mesh::decode_actor_payload::<ClusterCall>(&bytes) {
            let again = mesh::encode_actor_payload(&back).expect("re-encodes");
            assert_eq!(mesh::decode_actor_payload::<ClusterCall>(&again).ok(), Some(back));
        }
    }
});
