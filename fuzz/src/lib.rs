//! Helpers shared by the fuzz targets: what every tokenizer must satisfy, and the
//! real tokenizer the text target runs on.

use std::io::Cursor;
use std::sync::OnceLock;

use swarm_node::inference::gguf::{parse_header, read_header};
use swarm_node::inference::testing::{bytes_to_unicode, tiny_model, TinySpec};
use swarm_node::inference::tokenizer::{TextTokenizer, VocabKind};

/// Exercises `tok` on `text` and on arbitrary ids. Properties: no panic; ids it
/// produces are in its vocabulary; the pieces a stream yields, joined, are a
/// prefix of the whole decoded text (what a streaming client shows is what the
/// final answer says); with `round_trip`, text without `<` (every control token
/// of the vocabularies we load starts with it, and those are skipped on decode)
/// decodes back to itself, less what the vocabulary cannot represent.
pub fn exercise_tokenizer(tok: &TextTokenizer, text: &str, raw_ids: &[u32], round_trip: bool) {
    let vocab = tok.vocab_size();
    if let Ok(ids) = tok.encode(text) {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            panic!("encode gave id {bad} outside the vocabulary of {vocab}");
        }
        if let Ok(with_bos) = tok.encode_with_bos(text) {
            assert!(with_bos.ends_with(&ids));
        }
        if let Ok(back) = tok.decode(&ids) {
            if round_trip && !text.contains('<') {
                assert_eq!(
                    back,
                    representable(tok, text),
                    "decode(encode(text)) is not the text"
                );
            }
        }
        stream_is_prefix(tok, &ids);
    }
    let _ = tok.decode(raw_ids);
    for &id in raw_ids.iter().take(16) {
        let _ = tok.token_text(id);
        let _ = tok.is_stop(id);
    }
    stream_is_prefix(tok, raw_ids);
}

/// What a byte-level vocabulary can give back of `text`: bytes whose symbol is
/// not in the vocabulary are dropped when encoding (no unknown token; llama.cpp
/// does the same), and the rest decodes lossily. SmolLM2 lacks 21 of the 256
/// (controls like U+0016, and lead bytes of planes 4 to 16), found by fuzzing.
pub fn representable(tok: &TextTokenizer, text: &str) -> String {
    if tok.kind != VocabKind::ByteLevel {
        return text.to_string();
    }
    let known: Vec<bool> = bytes_to_unicode()
        .iter()
        .map(|c| tok.token_to_id(&c.to_string()).is_some())
        .collect();
    let kept: Vec<u8> = text.bytes().filter(|&b| known[usize::from(b)]).collect();
    String::from_utf8_lossy(&kept).into_owned()
}

fn stream_is_prefix(tok: &TextTokenizer, ids: &[u32]) {
    let mut stream = tok.stream();
    let mut shown = String::new();
    for &id in ids {
        match stream.push(id) {
            Ok(Some(piece)) => shown.push_str(&piece),
            Ok(None) => {}
            Err(_) => return,
        }
    }
    if let Ok(all) = stream.text() {
        assert!(
            all.starts_with(&shown),
            "streamed {shown:?} but the text is {all:?}"
        );
    }
}

/// The real SmolLM2 tokenizer from the model cache (`slm-swarm models pull
/// smollm2-135m`), or `SLM_SWARM_FUZZ_GGUF` if set; without either, the tiny
/// byte-level one the node's tests build. Loaded once per process.
pub fn real_tokenizer() -> &'static TextTokenizer {
    static TOK: OnceLock<TextTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = std::env::var_os("SLM_SWARM_FUZZ_GGUF")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                let cat = swarm_node::models::Catalog::builtin().ok()?;
                let home = swarm_node::models::home_dir();
                let entry = cat.get("smollm2-135m").ok()?;
                entry.is_installed(&home).then(|| entry.install_path(&home))
            });
        let content = match path {
            Some(p) => {
                eprintln!("tokenizer from {}", p.display());
                read_header(&p).expect("model header").1
            }
            None => {
                eprintln!("smollm2-135m not in the model cache: using the tiny test tokenizer");
                let (_dir, p) = tiny_model(&TinySpec::default()).expect("tiny model");
                let bytes = std::fs::read(p).expect("tiny model bytes");
                parse_header(&mut Cursor::new(bytes)).expect("tiny header")
            }
        };
        TextTokenizer::from_gguf(&content).expect("tokenizer")
    })
}

/// Little-endian u16 pairs as token ids: small enough to land in real vocabularies.
pub fn ids_from(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(2)
        .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
        .collect()
}
