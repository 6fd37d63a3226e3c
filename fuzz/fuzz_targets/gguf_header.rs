//! A model file's header from arbitrary bytes: GGUF parsing, then everything the
//! engine reads from it before any weight (hyper-parameters, tokenizer).
//!
//! Properties: no panic (a bad file is an error, never a crash of the node or
//! CLI); hyper-parameters that load are consistent (heads divide evenly); a
//! tokenizer that loads satisfies `exercise_tokenizer`.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use slm_swarm_fuzz::exercise_tokenizer;
use swarm_node::inference::gguf::{file_type_name, parse_header, ModelConfig};
use swarm_node::inference::tokenizer::TextTokenizer;

fuzz_target!(|bytes: &[u8]| {
    let Ok(content) = parse_header(&mut Cursor::new(bytes)) else {
        return;
    };
    if let Ok(cfg) = ModelConfig::from_content(&content) {
        assert!(cfg.n_head > 0 && cfg.n_kv_head > 0 && cfg.n_head % cfg.n_kv_head == 0);
        let _ = cfg.approx_params();
        for i in 0..cfg.n_layer.min(64) {
            let _ = cfg.is_local_layer(i);
        }
        let _ = file_type_name(cfg.file_type);
    }
    if let Ok(tok) = TextTokenizer::from_gguf(&content) {
        exercise_tokenizer(
            &tok,
            "Hello, world! 42 é 日本 <|im_end|>",
            &[0, 1, 2, 255, 256, 1000, u32::MAX],
            false,
        );
    }
});
