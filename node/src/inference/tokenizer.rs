//! Tokenizer built from a GGUF file's own metadata (no tokenizer.json needed):
//! byte-level BPE for `gpt2` vocabularies (SmolLM2, Qwen2.5) and SentencePiece-style
//! BPE with byte fallback for `llama` vocabularies (Gemma 3), on the `tokenizers` crate.
//! The pre-tokenizer follows llama.cpp's choice for `tokenizer.ggml.pre`.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Content;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{replace::Replace, unicode::NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, SplitDelimiterBehavior, Tokenizer};

use super::gguf::Meta;
use super::InferenceError;

const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp's `llama_token_type`).
const TT_NORMAL: i32 = 1;
const TT_CONTROL: i32 = 3;
const TT_USER_DEFINED: i32 = 4;

/// Names of control tokens that end a turn in the chat formats we know.
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<eos>",
    "</s>",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VocabKind {
    /// GPT-2 byte-level BPE (`tokenizer.ggml.model = gpt2`).
    ByteLevel,
    /// SentencePiece vocabulary with scores and byte fallback (`llama`).
    SentencePiece,
}

/// A tokenizer plus the special ids generation needs.
pub struct TextTokenizer {
    inner: Tokenizer,
    pub kind: VocabKind,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    /// Ids that end generation (EOS and end-of-turn markers).
    pub stop_ids: Vec<u32>,
    vocab_size: usize,
}

impl TextTokenizer {
    pub fn from_gguf(content: &Content) -> Result<Self, InferenceError> {
        let m = Meta::new(content);
        let model = m.str("tokenizer.ggml.model")?;
        let tokens = m.strings("tokenizer.ggml.tokens")?;
        let types = m
            .i32s("tokenizer.ggml.token_type")
            .unwrap_or_else(|_| vec![TT_NORMAL; tokens.len()]);
        if types.len() != tokens.len() {
            return Err(InferenceError::BadModel(
                "token_type and tokens differ in length".into(),
            ));
        }
        let bos = m.u32_opt("tokenizer.ggml.bos_token_id");
        let eos = m.u32_opt("tokenizer.ggml.eos_token_id");
        let (kind, mut tok) = match model {
            "gpt2" => {
                let merges = m.strings("tokenizer.ggml.merges")?;
                let pre = m.str_opt("tokenizer.ggml.pre").unwrap_or("default");
                (VocabKind::ByteLevel, build_byte_level(&tokens, &merges, pre)?)
            }
            "llama" => {
                let scores = m.f32s("tokenizer.ggml.scores")?;
                let add_space_prefix = m.bool_opt("tokenizer.ggml.add_space_prefix").unwrap_or(true);
                (
                    VocabKind::SentencePiece,
                    build_sentencepiece(&tokens, &scores, &types, add_space_prefix)?,
                )
            }
            other => {
                return Err(InferenceError::Unsupported(format!(
                    "tokenizer model `{other}` (supported: gpt2, llama)"
                )))
            }
        };
        // Control tokens are matched as specials (chat templates use them);
        // user-defined tokens are matched in raw text too, as llama.cpp does.
        let mut special = Vec::new();
        let mut user = Vec::new();
        for (tok_str, ty) in tokens.iter().zip(types.iter()) {
            match *ty {
                TT_CONTROL => special.push(AddedToken::from(tok_str.to_string(), true)),
                TT_USER_DEFINED => user.push(
                    AddedToken::from(tok_str.to_string(), false)
                        .normalized(false)
                        .special(false),
                ),
                _ => {}
            }
        }
        tok.add_special_tokens(special)
            .map_err(|e| InferenceError::Tokenizer(e.to_string()))?;
        tok.add_tokens(user)
            .map_err(|e| InferenceError::Tokenizer(e.to_string()))?;

        let mut stop_ids: Vec<u32> = eos.into_iter().collect();
        for name in END_OF_TURN {
            if let Some(pos) = tokens.iter().position(|t| t == name) {
                if types.get(pos) == Some(&TT_CONTROL) && !stop_ids.contains(&(pos as u32)) {
                    stop_ids.push(pos as u32);
                }
            }
        }
        let add_bos = m
            .bool_opt("tokenizer.ggml.add_bos_token")
            .unwrap_or(kind == VocabKind::SentencePiece);
        Ok(Self {
            inner: tok,
            kind,
            bos,
            eos,
            add_bos: add_bos && bos.is_some(),
            stop_ids,
            vocab_size: tokens.len(),
        })
    }

    /// Token ids of `text`; control tokens written in the text are recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, InferenceError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| InferenceError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Like [`encode`], with BOS in front when the model asks for it.
    pub fn encode_with_bos(&self, text: &str) -> Result<Vec<u32>, InferenceError> {
        let mut ids = Vec::new();
        if self.add_bos {
            if let Some(b) = self.bos {
                ids.push(b);
            }
        }
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, InferenceError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| InferenceError::Tokenizer(e.to_string()))
    }

    /// The text of one token, special or not (for logprob reports).
    pub fn token_text(&self, id: u32) -> String {
        match self.inner.decode(&[id], false) {
            Ok(s) => s,
            Err(_) => self.inner.id_to_token(id).unwrap_or_default(),
        }
    }

    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    /// Incremental detokeniser: yields text only once it forms whole characters.
    pub fn stream(&self) -> TokenStream<'_> {
        TokenStream {
            tok: self,
            ids: Vec::new(),
            shown: String::new(),
        }
    }
}

/// Turns a growing list of ids into text increments without splitting UTF-8
/// characters. What it has yielded is never taken back: a vocabulary whose later
/// tokens rewrite earlier text (only malformed ones do: found by fuzzing, an SPM
/// vocabulary with broken byte tokens) yields nothing more, and its text ends
/// at what was shown.
pub struct TokenStream<'a> {
    tok: &'a TextTokenizer,
    ids: Vec<u32>,
    shown: String,
}

impl TokenStream<'_> {
    pub fn push(&mut self, id: u32) -> Result<Option<String>, InferenceError> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids)?;
        // Held back: an incomplete character, nothing new, or a rewrite of what was shown.
        if text.ends_with('\u{FFFD}') || text.len() <= self.shown.len() || !text.starts_with(&self.shown) {
            return Ok(None);
        }
        let out = text[self.shown.len()..].to_string();
        self.shown.push_str(&out);
        Ok(Some(out))
    }

    /// The whole text: the decoded ids when they extend what was yielded,
    /// else what was yielded.
    pub fn text(&self) -> Result<String, InferenceError> {
        let text = self.tok.decode(&self.ids)?;
        if text.starts_with(&self.shown) {
            Ok(text)
        } else {
            Ok(self.shown.clone())
        }
    }
}

fn build_byte_level(tokens: &[&str], merges: &[&str], pre: &str) -> Result<Tokenizer, InferenceError> {
    let vocab = vocab_map(tokens);
    let merges: Vec<(String, String)> = merges
        .iter()
        .filter_map(|m| m.split_once(' '))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    // The tokenizers crate indexes a buffer as long as the longest token with the
    // merged pair before it checks the pair is a token, so a merge whose result is
    // not in the vocabulary would panic there (found by fuzzing): refuse it here.
    if let Some((a, b)) = merges
        .iter()
        .find(|(a, b)| !vocab.contains_key(&format!("{a}{b}")))
    {
        return Err(InferenceError::BadModel(format!(
            "merge `{a} {b}` makes a token that is not in the vocabulary"
        )));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| InferenceError::Tokenizer(e.to_string()))?;
    let mut tok = Tokenizer::new(bpe);
    let split = |pattern: &str| -> Result<Split, InferenceError> {
        Split::new(
            SplitPattern::Regex(pattern.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| InferenceError::Tokenizer(e.to_string()))
    };
    match pre {
        // llama.cpp: STARCODER/SMOLLM/REFACT split single digits, then the GPT-2 regex.
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            tok.with_pre_tokenizer(Some(PreSequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])));
        }
        "qwen2" | "deepseek-r1-qwen" => {
            tok.with_pre_tokenizer(Some(PreSequence::new(vec![
                split(QWEN2_PATTERN)?.into(),
                ByteLevel::new(false, true, false).into(),
            ])));
            tok.with_normalizer(Some(NFC))
                .map_err(|e| InferenceError::Tokenizer(e.to_string()))?;
        }
        "llama-bpe" | "llama3" | "smaug-bpe" => {
            tok.with_pre_tokenizer(Some(PreSequence::new(vec![
                split(LLAMA3_PATTERN)?.into(),
                ByteLevel::new(false, true, false).into(),
            ])));
        }
        _ => {
            tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        }
    }
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tok)
}

/// SentencePiece BPE: the GGUF has scores, not merges. A merge `a b` exists
/// when `a`, `b` and `ab` are tokens; its rank follows the score of `ab`
/// (higher first), as llama.cpp's SPM tokenizer and HF's converter do.
fn build_sentencepiece(
    tokens: &[&str],
    scores: &[f32],
    types: &[i32],
    add_space_prefix: bool,
) -> Result<Tokenizer, InferenceError> {
    if scores.len() != tokens.len() {
        return Err(InferenceError::BadModel(
            "scores and tokens differ in length".into(),
        ));
    }
    let vocab = vocab_map(tokens);
    let normal: HashMap<&str, u32> = tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, t))| **t == TT_NORMAL)
        .map(|(i, (s, _))| (*s, i as u32))
        .collect();
    let mut merges: Vec<(f32, u32, u32, &str, &str)> = Vec::new();
    for (piece, &id) in &normal {
        for (split_at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split_at);
            if let (Some(&li), Some(&ri)) = (normal.get(l), normal.get(r)) {
                merges.push((scores[id as usize], li, ri, l, r));
            }
        }
    }
    // Score descending, then the ids of the parts, for a deterministic order.
    merges.sort_by(|a, b| {
        b.0.partial_cmp(&a.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
    });
    let merges: Vec<(String, String)> = merges
        .into_iter()
        .map(|(_, _, _, l, r)| (l.to_string(), r.to_string()))
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = tokens.iter().find(|t| **t == "<unk>") {
        builder = builder.unk_token(unk.to_string());
    }
    let bpe = builder
        .build()
        .map_err(|e| InferenceError::Tokenizer(e.to_string()))?;
    let mut tok = Tokenizer::new(bpe);
    let replace = Replace::new(" ", "\u{2581}").map_err(|e| InferenceError::Tokenizer(e.to_string()))?;
    if add_space_prefix {
        tok.with_normalizer(Some(tokenizers::normalizers::Sequence::new(vec![
            tokenizers::normalizers::prepend::Prepend::new("\u{2581}".into()).into(),
            replace.into(),
        ])))
        .map_err(|e| InferenceError::Tokenizer(e.to_string()))?;
    } else {
        tok.with_normalizer(Some(replace))
            .map_err(|e| InferenceError::Tokenizer(e.to_string()))?;
    }
    let space = tokenizers::decoders::DecoderWrapper::Replace(
        Replace::new("\u{2581}", " ").map_err(|e| InferenceError::Tokenizer(e.to_string()))?,
    );
    let mut decoders: Vec<DecoderWrapper> = vec![space, ByteFallback::new().into(), Fuse::new().into()];
    if add_space_prefix {
        decoders.push(tokenizers::decoders::strip::Strip::new(' ', 1, 0).into());
    }
    tok.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tok)
}

/// Token string → id; on duplicate strings the first id wins.
fn vocab_map(tokens: &[&str]) -> Vocab {
    let mut vocab = Vocab::default();
    for (i, t) in tokens.iter().enumerate() {
        vocab.entry(t.to_string()).or_insert(i as u32);
    }
    vocab
}

#[cfg(test)]
mod tests {
    //! The tokenizer fuzz targets' properties, bounded, on the tiny byte-level
    //! vocabulary the tests build (node/tests/real_models.rs has them on SmolLM2's).

    use std::io::Cursor;
    use std::sync::OnceLock;

    use candle_core::quantized::gguf_file::Value;
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;
    use crate::inference::gguf::parse_header;
    use crate::inference::testing::{tiny_model, TinySpec};

    fn tiny() -> &'static TextTokenizer {
        static TOK: OnceLock<TextTokenizer> = OnceLock::new();
        TOK.get_or_init(|| {
            let (_dir, path) = tiny_model(&TinySpec::default()).expect("tiny model");
            let bytes = std::fs::read(path).expect("read");
            let content = parse_header(&mut Cursor::new(bytes)).expect("header");
            TextTokenizer::from_gguf(&content).expect("tokenizer")
        })
    }

    /// The pieces a stream yields, joined, are a prefix of the decoded text.
    fn stream_is_prefix(tok: &TextTokenizer, ids: &[u32]) -> Result<(), TestCaseError> {
        let mut stream = tok.stream();
        let mut shown = String::new();
        for &id in ids {
            if let Ok(Some(piece)) = stream.push(id) {
                shown.push_str(&piece);
            }
        }
        if let Ok(all) = stream.text() {
            prop_assert!(all.starts_with(&shown), "streamed {:?}, text {:?}", shown, all);
        }
        Ok(())
    }

    fn content(md: Vec<(&str, Value)>) -> Content {
        Content {
            magic: candle_core::quantized::gguf_file::VersionedMagic::GgufV3,
            metadata: md.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    fn strings(v: &[&str]) -> Value {
        Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect())
    }

    /// Fuzzing found that a merge whose two halves are tokens but whose result
    /// is not (and is longer than every token) panicked inside the tokenizers crate.
    #[test]
    fn a_merge_outside_the_vocabulary_is_an_error_not_a_panic() {
        for merge in ["ab ab", "a b", "ab b"] {
            let c = content(vec![
                ("tokenizer.ggml.model", Value::String("gpt2".into())),
                ("tokenizer.ggml.tokens", strings(&["a", "b", "ab"])),
                ("tokenizer.ggml.merges", strings(&[merge])),
            ]);
            match TextTokenizer::from_gguf(&c) {
                Err(InferenceError::BadModel(m)) => assert!(m.contains("merge"), "{m}"),
                Err(e) if merge == "a b" => panic!("a valid merge was refused: {e}"),
                Ok(_) if merge == "a b" => {}
                other => panic!("merge {merge:?}: expected an error, got {:?}", other.err()),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn text_round_trips_and_streams_consistently(text in "\\PC{0,80}|[ -~é\\n\\t<|>]{0,80}") {
            let tok = tiny();
            let ids = tok.encode(&text).expect("encode");
            prop_assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
            if !text.contains('<') {
                prop_assert_eq!(tok.decode(&ids).expect("decode"), text);
            }
            stream_is_prefix(tok, &ids)?;
        }

        #[test]
        fn arbitrary_ids_never_panic(ids in vec(prop_oneof![0u32..300, any::<u32>()], 0..40)) {
            let tok = tiny();
            let _ = tok.decode(&ids);
            for &id in &ids {
                let _ = tok.token_text(id);
            }
            stream_is_prefix(tok, &ids)?;
        }
    }
}
