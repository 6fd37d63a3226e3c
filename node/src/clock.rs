//! The wall clock in Unix milliseconds: stamps for adverts, logs and records
//! (never for expiry decisions, which use monotonic time).

use std::time::{SystemTime, UNIX_EPOCH};

pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
