//! Reading a GGUF file's header: typed metadata access and the model
//! hyper-parameters the transformer needs, for the architectures we run.

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};

use super::InferenceError;

/// The decoder-only architectures this engine implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
    Gemma3,
}

impl Arch {
    pub fn parse(s: &str) -> Result<Self, InferenceError> {
        match s {
            "llama" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            "gemma3" => Ok(Arch::Gemma3),
            other => Err(InferenceError::Unsupported(format!(
                "architecture `{other}` (supported: llama, qwen2, gemma3)"
            ))),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3",
        }
    }
}

/// Typed view over GGUF metadata.
pub struct Meta<'a> {
    pub md: &'a HashMap<String, Value>,
}

impl<'a> Meta<'a> {
    pub fn new(content: &'a Content) -> Self {
        Self {
            md: &content.metadata,
        }
    }

    fn get(&self, key: &str) -> Result<&'a Value, InferenceError> {
        self.md
            .get(key)
            .ok_or_else(|| InferenceError::BadModel(format!("GGUF metadata lacks `{key}`")))
    }

    pub fn u32(&self, key: &str) -> Result<u32, InferenceError> {
        let v = self.get(key)?;
        match v {
            Value::U8(x) => Ok(*x as u32),
            Value::U16(x) => Ok(*x as u32),
            Value::U32(x) => Ok(*x),
            Value::I32(x) if *x >= 0 => Ok(*x as u32),
            Value::U64(x) => u32::try_from(*x).map_err(|_| bad_type(key)),
            Value::I64(x) => u32::try_from(*x).map_err(|_| bad_type(key)),
            _ => Err(bad_type(key)),
        }
    }

    pub fn u32_opt(&self, key: &str) -> Option<u32> {
        self.md.get(key).and_then(|_| self.u32(key).ok())
    }

    pub fn f32(&self, key: &str) -> Result<f32, InferenceError> {
        match self.get(key)? {
            Value::F32(x) => Ok(*x),
            Value::F64(x) => Ok(*x as f32),
            _ => Err(bad_type(key)),
        }
    }

    pub fn f32_opt(&self, key: &str) -> Option<f32> {
        self.md.get(key).and_then(|_| self.f32(key).ok())
    }

    pub fn bool_opt(&self, key: &str) -> Option<bool> {
        match self.md.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    pub fn str(&self, key: &str) -> Result<&'a str, InferenceError> {
        match self.get(key)? {
            Value::String(s) => Ok(s.as_str()),
            _ => Err(bad_type(key)),
        }
    }

    pub fn str_opt(&self, key: &str) -> Option<&'a str> {
        match self.md.get(key) {
            Some(Value::String(s)) => Some(s.as_str()),
            _ => None,
        }
    }

    pub fn strings(&self, key: &str) -> Result<Vec<&'a str>, InferenceError> {
        match self.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    _ => Err(bad_type(key)),
                })
                .collect(),
            _ => Err(bad_type(key)),
        }
    }

    pub fn f32s(&self, key: &str) -> Result<Vec<f32>, InferenceError> {
        match self.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::F32(x) => Ok(*x),
                    Value::F64(x) => Ok(*x as f32),
                    _ => Err(bad_type(key)),
                })
                .collect(),
            _ => Err(bad_type(key)),
        }
    }

    pub fn i32s(&self, key: &str) -> Result<Vec<i32>, InferenceError> {
        match self.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::I32(x) => Ok(*x),
                    Value::U32(x) => Ok(*x as i32),
                    Value::I8(x) => Ok(*x as i32),
                    Value::U8(x) => Ok(*x as i32),
                    _ => Err(bad_type(key)),
                })
                .collect(),
            _ => Err(bad_type(key)),
        }
    }
}

fn bad_type(key: &str) -> InferenceError {
    InferenceError::BadModel(format!("GGUF metadata `{key}` has an unexpected type"))
}

/// Hyper-parameters of a decoder-only transformer, read from GGUF metadata.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub name: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub rope_dim: usize,
    pub rope_base: f32,
    /// Gemma 3 uses another base on its sliding-window layers.
    pub rope_base_local: f32,
    pub rms_eps: f64,
    pub context_length: usize,
    /// Gemma 3: window size of the local layers; every `swa_period`-th layer is global.
    pub sliding_window: Option<usize>,
    pub swa_period: usize,
    pub vocab_size: usize,
    pub file_type: Option<u32>,
}

impl ModelConfig {
    pub fn from_content(content: &Content) -> Result<Self, InferenceError> {
        let m = Meta::new(content);
        let arch = Arch::parse(m.str("general.architecture")?)?;
        let p = arch.as_str();
        let key = |s: &str| format!("{p}.{s}");
        let n_embd = m.u32(&key("embedding_length"))? as usize;
        let n_head = m.u32(&key("attention.head_count"))? as usize;
        if n_head == 0 {
            return Err(InferenceError::BadModel("attention.head_count is 0".into()));
        }
        let n_kv_head = m
            .u32_opt(&key("attention.head_count_kv"))
            .unwrap_or(n_head as u32) as usize;
        if n_kv_head == 0 || !n_head.is_multiple_of(n_kv_head) {
            return Err(InferenceError::BadModel(format!(
                "head_count {n_head} is not a multiple of head_count_kv {n_kv_head}"
            )));
        }
        let head_dim = m
            .u32_opt(&key("attention.key_length"))
            .map(|v| v as usize)
            .unwrap_or(n_embd / n_head);
        let rope_dim = m
            .u32_opt(&key("rope.dimension_count"))
            .map(|v| v as usize)
            .unwrap_or(head_dim);
        let default_base = match arch {
            Arch::Llama => 10_000.0,
            Arch::Qwen2 | Arch::Gemma3 => 1_000_000.0,
        };
        let vocab_size = match content.metadata.get("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a.len(),
            _ => m.u32(&key("vocab_size"))? as usize,
        };
        Ok(Self {
            arch,
            name: m.str_opt("general.name").unwrap_or("unnamed").to_string(),
            n_layer: m.u32(&key("block_count"))? as usize,
            n_embd,
            n_ff: m.u32(&key("feed_forward_length"))? as usize,
            n_head,
            n_kv_head,
            head_dim,
            rope_dim,
            rope_base: m.f32_opt(&key("rope.freq_base")).unwrap_or(default_base),
            rope_base_local: m.f32_opt(&key("rope.local_freq_base")).unwrap_or(10_000.0),
            rms_eps: m.f32(&key("attention.layer_norm_rms_epsilon"))? as f64,
            context_length: m.u32_opt(&key("context_length")).unwrap_or(2048) as usize,
            sliding_window: match arch {
                Arch::Gemma3 => m.u32_opt(&key("attention.sliding_window")).map(|v| v as usize),
                _ => None,
            },
            swa_period: m
                .u32_opt(&key("attention.sliding_window_pattern"))
                .unwrap_or(6)
                .max(1) as usize,
            vocab_size,
            file_type: m.u32_opt("general.file_type"),
        })
    }

    /// Parameter count estimated from the shapes (embeddings counted once).
    /// Saturating: the shapes come from the file, and absurd ones must give a
    /// huge count, not wrap to a small one (found by fuzzing).
    pub fn approx_params(&self) -> u64 {
        let (d, head) = (self.n_embd as u64, self.head_dim as u64);
        let q = d.saturating_mul((self.n_head as u64).saturating_mul(head));
        let kv = d.saturating_mul((self.n_kv_head as u64).saturating_mul(head));
        let attn = q.saturating_add(kv).saturating_mul(2);
        let ffn = d.saturating_mul(self.n_ff as u64).saturating_mul(3);
        (self.n_layer as u64)
            .saturating_mul(attn.saturating_add(ffn))
            .saturating_add((self.vocab_size as u64).saturating_mul(d))
    }

    /// Whether layer `i` attends only within the sliding window.
    pub fn is_local_layer(&self, i: usize) -> bool {
        self.sliding_window.is_some() && !(i + 1).is_multiple_of(self.swa_period)
    }
}

/// Human name of llama.cpp's `general.file_type` codes we meet.
pub fn file_type_name(ft: Option<u32>) -> &'static str {
    match ft {
        Some(0) => "F32",
        Some(1) => "F16",
        Some(2) => "Q4_0",
        Some(3) => "Q4_1",
        Some(7) => "Q8_0",
        Some(8) => "Q5_0",
        Some(9) => "Q5_1",
        Some(10) => "Q2_K",
        Some(12) => "Q3_K_M",
        Some(14) => "Q4_K_S",
        Some(15) => "Q4_K_M",
        Some(17) => "Q5_K_M",
        Some(18) => "Q6_K",
        _ => "unknown",
    }
}

/// Open a GGUF file and read its header (no tensor data).
pub fn read_header(path: &Path) -> Result<(std::fs::File, Content), InferenceError> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| InferenceError::Io(format!("cannot open {}: {e}", path.display())))?;
    let content = parse_header(&mut file).map_err(|e| match e {
        InferenceError::BadModel(m) => InferenceError::BadModel(format!("{}: {m}", path.display())),
        other => other,
    })?;
    Ok((file, content))
}

/// Reads a GGUF header from any seekable source: the one parser of untrusted
/// model bytes, so tests and the fuzz targets can feed it bytes directly.
pub fn parse_header<R: Read + Seek>(reader: &mut R) -> Result<Content, InferenceError> {
    Content::read(reader).map_err(|e| InferenceError::BadModel(format!("not a readable GGUF file: {e}")))
}

#[cfg(test)]
mod tests {
    //! The `gguf_header` fuzz target's properties, bounded: any bytes, and
    //! mutations of real headers, parse or fail cleanly, and what loads is consistent.

    use std::io::Cursor;

    use candle_core::quantized::gguf_file;
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;
    use crate::inference::testing::{tiny_model, TinySpec};
    use crate::inference::tokenizer::TextTokenizer;

    /// The tiny test model's header (no tensor data): a real, complete header.
    fn tiny_header() -> Vec<u8> {
        let (_dir, path) = tiny_model(&TinySpec::default()).expect("tiny model");
        let bytes = std::fs::read(path).expect("read");
        let content = parse_header(&mut Cursor::new(&bytes)).expect("tiny header parses");
        let end = usize::try_from(content.tensor_data_offset).expect("offset");
        bytes[..end.min(bytes.len())].to_vec()
    }

    /// A header of the given metadata alone (no tensors).
    fn header(md: &[(&str, Value)]) -> Vec<u8> {
        let refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let mut out = Cursor::new(Vec::new());
        gguf_file::write(&mut out, &refs, &[]).expect("write");
        out.into_inner()
    }

    fn everything(bytes: &[u8]) -> Result<(), TestCaseError> {
        let Ok(content) = parse_header(&mut Cursor::new(bytes)) else {
            return Ok(());
        };
        if let Ok(cfg) = ModelConfig::from_content(&content) {
            prop_assert!(cfg.n_head > 0 && cfg.n_kv_head > 0 && cfg.n_head % cfg.n_kv_head == 0);
            let _ = cfg.approx_params();
            let _ = cfg.is_local_layer(0);
        }
        if let Ok(tok) = TextTokenizer::from_gguf(&content) {
            let _ = tok.encode("Hello, world! é <|im_end|>");
            let _ = tok.decode(&[0, 1, 2, 500, u32::MAX]);
        }
        Ok(())
    }

    /// Found by fuzzing: large shapes overflowed the parameter estimate (a panic
    /// with overflow checks, a wrapped small count without).
    #[test]
    fn absurd_shapes_saturate_the_parameter_estimate() {
        let big = |v: u32| Value::U32(v);
        let md = [
            ("general.architecture", Value::String("llama".into())),
            ("llama.block_count", big(u32::MAX)),
            ("llama.embedding_length", big(u32::MAX)),
            ("llama.feed_forward_length", big(u32::MAX)),
            ("llama.attention.head_count", big(1)),
            ("llama.attention.key_length", big(u32::MAX)),
            ("llama.vocab_size", big(u32::MAX)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ];
        let content = parse_header(&mut Cursor::new(header(&md))).expect("parse");
        let cfg = ModelConfig::from_content(&content).expect("config");
        assert_eq!(cfg.approx_params(), u64::MAX);
        let tiny = parse_header(&mut Cursor::new(tiny_header())).expect("tiny");
        let p = ModelConfig::from_content(&tiny)
            .expect("tiny config")
            .approx_params();
        // 2 layers × (attention 2·64·(64 + 32) + ffn 3·64·128) + 269 tokens × 64.
        assert_eq!(p, 90_944);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(mut bytes in vec(any::<u8>(), 0..512), magic in any::<bool>()) {
            if magic && bytes.len() >= 8 {
                bytes[..8].copy_from_slice(b"GGUF\x03\0\0\0");
            }
            everything(&bytes)?;
        }

        #[test]
        fn mutated_headers_never_panic(
            edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = tiny_header();
            for (at, b) in edits {
                let i = at.index(bytes.len());
                bytes[i] = b;
            }
            let end = cut.index(bytes.len() + 1);
            everything(&bytes)?;
            everything(&bytes[..end])?;
        }

        /// Any hyper-parameter values: loading them is an error or a consistent config.
        #[test]
        fn any_hyper_parameters_load_or_fail_cleanly(
            vals in vec(any::<u32>(), 8),
            eps in any::<f32>(),
            swa in proptest::option::of(any::<u32>()),
        ) {
            let mut md = vec![
                ("general.architecture", Value::String("gemma3".into())),
                ("gemma3.block_count", Value::U32(vals[0])),
                ("gemma3.embedding_length", Value::U32(vals[1])),
                ("gemma3.feed_forward_length", Value::U32(vals[2])),
                ("gemma3.attention.head_count", Value::U32(vals[3] % 64)),
                ("gemma3.attention.head_count_kv", Value::U32(vals[4] % 64)),
                ("gemma3.attention.key_length", Value::U32(vals[5])),
                ("gemma3.vocab_size", Value::U32(vals[6])),
                ("gemma3.context_length", Value::U32(vals[7])),
                ("gemma3.attention.layer_norm_rms_epsilon", Value::F32(eps)),
            ];
            if let Some(p) = swa {
                md.push(("gemma3.attention.sliding_window", Value::U32(4096)));
                md.push(("gemma3.attention.sliding_window_pattern", Value::U32(p)));
            }
            everything(&header(&md))?;
        }
    }
}
