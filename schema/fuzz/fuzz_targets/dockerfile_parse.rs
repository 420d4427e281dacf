//! Arbitrary Dockerfile text through `schema::dockerfile::parse`: it must
//! answer a line-numbered error or a build, never panic or recurse without
//! bound; a build must name only relative sources that stay in the context,
//! point each at a COPY step, and survive a JSON round trip as the node
//! will read it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use schema::dockerfile::{check_source, parse};
use schema::template::BuildStart;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match parse(&text) {
        Err(e) => {
            assert!(e.line >= 1, "{e}");
            assert!(e.line <= text.lines().count().max(1), "{e}");
        }
        Ok(d) => {
            assert!(d.start.from_image.is_some());
            for c in &d.copies {
                assert!(check_source(&c.src).is_ok(), "{:?}", c.src);
                let step = &d.start.steps[c.step];
                assert_eq!(step.kind, "COPY");
                assert_eq!(step.args[0], c.src);
                assert_eq!(step.args.len(), 4);
            }
            let json = serde_json::to_vec(&d.start).expect("serializes");
            let back: BuildStart = serde_json::from_slice(&json).expect("reads back");
            assert_eq!(back, d.start);
        }
    }
});
