#!/usr/bin/env python3
"""Writes the gguf_header seed corpus: small GGUF v3 headers (metadata, no tensors)
for each architecture and tokenizer kind the engine loads, so the fuzzer starts
from files that parse all the way through. Run from anywhere; rewrites
fuzz/seeds/gguf_header/*.gguf."""
import os
import struct

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)


def s(x):
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def val(t, v):
    if t == U32:
        return struct.pack("<I", v)
    if t == I32:
        return struct.pack("<i", v)
    if t == F32:
        return struct.pack("<f", v)
    if t == BOOL:
        return struct.pack("<B", 1 if v else 0)
    if t == STR:
        return s(v)
    raise ValueError(t)


def arr(t, items):
    return struct.pack("<IQ", t, len(items)) + b"".join(val(t, i) for i in items)


def gguf(kvs):
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs))
    for key, t, v in kvs:
        out += s(key) + struct.pack("<I", t)
        out += arr(*v) if t == ARR else val(t, v)
    return out


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def hparams(arch):
    return [
        ("general.architecture", STR, arch),
        ("general.name", STR, "seed-" + arch),
        ("general.file_type", U32, 7),
        (arch + ".block_count", U32, 2),
        (arch + ".context_length", U32, 512),
        (arch + ".embedding_length", U32, 64),
        (arch + ".feed_forward_length", U32, 128),
        (arch + ".attention.head_count", U32, 4),
        (arch + ".attention.head_count_kv", U32, 2),
        (arch + ".rope.freq_base", F32, 10000.0),
        (arch + ".attention.layer_norm_rms_epsilon", F32, 1e-5),
    ]


def byte_level(pre):
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = [("h", "e"), ("Ġ", "t"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r")]
    tokens = specials + bytes_to_unicode() + [a + b for a, b in merges]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return [
        ("tokenizer.ggml.model", STR, "gpt2"),
        ("tokenizer.ggml.pre", STR, pre),
        ("tokenizer.ggml.tokens", ARR, (STR, tokens)),
        ("tokenizer.ggml.token_type", ARR, (I32, types)),
        ("tokenizer.ggml.merges", ARR, (STR, [a + " " + b for a, b in merges])),
        ("tokenizer.ggml.bos_token_id", U32, 0),
        ("tokenizer.ggml.eos_token_id", U32, 2),
        ("tokenizer.ggml.add_bos_token", BOOL, False),
        ("tokenizer.chat_template", STR,
         "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"),
    ]


def sentencepiece():
    tokens = ["<unk>", "<bos>", "<eos>", "<end_of_turn>"] + ["<0x%02X>" % b for b in range(256)]
    types = [2, 3, 3, 3] + [6] * 256
    pieces = ["▁", "a", "b", "c", "▁a", "ab", "▁ab", "▁abc", "bc"]
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * (len(tokens) - len(pieces)) + [-float(i) for i in range(len(pieces))]
    return [
        ("tokenizer.ggml.model", STR, "llama"),
        ("tokenizer.ggml.tokens", ARR, (STR, tokens)),
        ("tokenizer.ggml.token_type", ARR, (I32, types)),
        ("tokenizer.ggml.scores", ARR, (F32, scores)),
        ("tokenizer.ggml.bos_token_id", U32, 1),
        ("tokenizer.ggml.eos_token_id", U32, 2),
        ("tokenizer.ggml.add_space_prefix", BOOL, True),
    ]


out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gguf_header")
os.makedirs(out, exist_ok=True)
files = {
    "llama-smollm.gguf": hparams("llama") + byte_level("smollm"),
    "qwen2.gguf": hparams("qwen2") + byte_level("qwen2"),
    "llama3-bpe.gguf": hparams("llama") + byte_level("llama-bpe"),
    "gemma3-spm.gguf": hparams("gemma3")
    + [("gemma3.attention.sliding_window", U32, 128), ("gemma3.attention.key_length", U32, 16)]
    + sentencepiece(),
    "no-tokenizer.gguf": hparams("llama"),
}
for name, kvs in files.items():
    with open(os.path.join(out, name), "wb") as f:
        f.write(gguf(kvs))
    print(name, len(gguf(kvs)), "bytes")
