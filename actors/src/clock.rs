//! Wall-clock times as sandbox records and the E2B API carry them:
//! milliseconds since the Unix epoch, written as RFC 3339.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Now, in milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// `ms` (since the Unix epoch) as the API writes times.
pub fn rfc3339_ms(ms: u64) -> String {
    schema::e2b::format_rfc3339(UNIX_EPOCH + Duration::from_millis(ms))
}
