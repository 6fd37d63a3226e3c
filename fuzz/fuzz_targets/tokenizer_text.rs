//! The real SmolLM2 tokenizer (see `real_tokenizer`) on arbitrary text and ids:
//! the prompt and answer paths of every query.
//!
//! Input: text, then after the first NUL bytes read as token ids.
//! Properties: those of `exercise_tokenizer`, with the round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use slm_swarm_fuzz::{exercise_tokenizer, ids_from, real_tokenizer};

fuzz_target!(|bytes: &[u8]| {
    let cut = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let text = String::from_utf8_lossy(&bytes[..cut]);
    let ids = ids_from(bytes.get(cut + 1..).unwrap_or(&[]));
    exercise_tokenizer(real_tokenizer(), &text, &ids, true);
});
