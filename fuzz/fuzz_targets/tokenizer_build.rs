//! Building a tokenizer from GGUF tokenizer metadata the fuzzer shapes (vocabulary,
//! token types, merges, scores, pre-tokenizer, special ids), then using it: the
//! loading path of a model file, past the byte-level parser `gguf_header` covers.
//!
//! Properties: no panic; a tokenizer that builds satisfies `exercise_tokenizer`.
#![no_main]

use std::collections::HashMap;

use arbitrary::Arbitrary;
use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use libfuzzer_sys::fuzz_target;
use slm_swarm_fuzz::exercise_tokenizer;
use swarm_node::inference::testing::bytes_to_unicode;
use swarm_node::inference::tokenizer::TextTokenizer;

const PRE: &[&str] = &[
    "default",
    "smollm",
    "qwen2",
    "llama-bpe",
    "starcoder",
    "deepseek-r1-qwen",
    "gpt2",
];
/// Keeps one run fast: real vocabularies are larger, but the code paths are the same.
const MAX_TOKENS: usize = 600;

#[derive(Arbitrary, Debug)]
struct Input {
    /// `llama` (SentencePiece) rather than `gpt2` (byte-level BPE).
    sentencepiece: bool,
    /// Start the vocabulary with every byte (GPT-2's printable map, or `<0xNN>`).
    with_bytes: bool,
    tokens: Vec<String>,
    /// Token types, 1..=6 as GGUF has them; none = the key is absent.
    types: Option<Vec<u8>>,
    /// Merges as pairs of token indices, plus raw merge strings.
    merges: Vec<(u16, u16)>,
    raw_merges: Vec<String>,
    scores: Option<Vec<f32>>,
    pre: u8,
    bos: Option<u16>,
    eos: Option<u16>,
    add_bos: Option<bool>,
    add_space_prefix: Option<bool>,
    text: String,
    ids: Vec<u16>,
}

fn strings(v: Vec<String>) -> Value {
    Value::Array(v.into_iter().map(Value::String).collect())
}

fuzz_target!(|input: Input| {
    let mut tokens: Vec<String> = Vec::new();
    if input.with_bytes {
        if input.sentencepiece {
            tokens.push("<unk>".into());
            tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        } else {
            tokens.extend(bytes_to_unicode().into_iter().map(String::from));
        }
    }
    tokens.extend(input.tokens);
    tokens.truncate(MAX_TOKENS);
    let n = tokens.len();
    let mut md: HashMap<String, Value> = HashMap::new();
    let model = if input.sentencepiece { "llama" } else { "gpt2" };
    md.insert("tokenizer.ggml.model".into(), Value::String(model.into()));
    if let Some(types) = input.types {
        // Byte tokens are type 6 (BYTE) in real SentencePiece files.
        // A longer list than the vocabulary is a malformed file the loader must refuse.
        let mut t: Vec<Value> = Vec::new();
        for i in 0..n.max(types.len().min(MAX_TOKENS + 1)) {
            let ty = match types.get(i) {
                Some(&x) => i32::from(x % 6) + 1,
                None if input.sentencepiece && input.with_bytes && (1..=256).contains(&i) => 6,
                None => 1,
            };
            t.push(Value::I32(ty));
        }
        md.insert("tokenizer.ggml.token_type".into(), Value::Array(t));
    }
    let mut merges: Vec<String> = input
        .merges
        .iter()
        .filter(|(a, b)| (*a as usize) < n && (*b as usize) < n)
        .map(|(a, b)| format!("{} {}", tokens[*a as usize], tokens[*b as usize]))
        .collect();
    merges.extend(input.raw_merges);
    merges.truncate(2 * MAX_TOKENS);
    md.insert("tokenizer.ggml.merges".into(), strings(merges));
    if let Some(mut scores) = input.scores {
        scores.truncate(MAX_TOKENS + 1);
        md.insert(
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        );
    }
    let pre = PRE.get(input.pre as usize).copied().unwrap_or("default");
    md.insert("tokenizer.ggml.pre".into(), Value::String(pre.into()));
    if let Some(b) = input.bos {
        md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(b.into()));
    }
    if let Some(e) = input.eos {
        md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(e.into()));
    }
    if let Some(a) = input.add_bos {
        md.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(a));
    }
    if let Some(a) = input.add_space_prefix {
        md.insert("tokenizer.ggml.add_space_prefix".into(), Value::Bool(a));
    }
    md.insert("tokenizer.ggml.tokens".into(), strings(tokens));
    let content = Content {
        magic: VersionedMagic::GgufV3,
        metadata: md,
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    };
    let Ok(tok) = TextTokenizer::from_gguf(&content) else {
        return;
    };
    let ids: Vec<u32> = input.ids.into_iter().map(u32::from).collect();
    exercise_tokenizer(&tok, &input.text, &ids, false);
});
