//! Connect envelopes and the messages inside them, as a client may send
//! them: split at any point, with any flags and lengths, carrying JSON or
//! protobuf that may be garbage. Nothing may panic.
#![no_main]

use envd::connect::Decoder;
use libfuzzer_sys::fuzz_target;
use schema::envd::{filesystem, process};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| *b as usize) % (data.len().max(1));
    let mut decoder = Decoder::default();
    for part in [&data[..split], &data[split..]] {
        decoder.push(part);
        while let Ok(Some(envelope)) = decoder.next_envelope() {
            let p = &envelope.payload;
            let _ = <process::StartRequest as prost::Message>::decode(&p[..]);
            let _ = <process::StreamInputRequest as prost::Message>::decode(&p[..]);
            let _ = <filesystem::WatchDirRequest as prost::Message>::decode(&p[..]);
            let _ = serde_json::from_slice::<process::StartRequest>(p);
            let _ = serde_json::from_slice::<process::StreamInputRequest>(p);
            let _ = serde_json::from_slice::<filesystem::EntryInfo>(p);
        }
    }
    let _ = decoder.finish();
});
