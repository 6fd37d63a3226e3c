#!/usr/bin/env python3
"""Independent reference embeddings for all-MiniLM-L6-v2.

A plain-numpy BERT forward pass (no candle, no torch) over the model files that
`slm-swarm models pull all-minilm-l6-v2` installs, with the sentence-transformers
recipe: mean pooling over the attention mask, then L2 normalisation. Tokens come
from the HuggingFace `tokenizers` Python package reading the same tokenizer.json.

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install numpy safetensors tokenizers
    /tmp/ref/bin/python data/reference/all_minilm_reference.py \
        ~/.cache/slm-swarm/models/all-minilm-l6-v2 > data/reference/all-minilm-l6-v2.json
"""
import json
import math
import sys

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

TEXTS = [
    "The cat sits on the mat",
    "Stock markets fell sharply today",
    "How do I kill a Python process?",
]


def layer_norm(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def embed(w, cfg, ids):
    p = ""
    if "bert.embeddings.word_embeddings.weight" in w:
        p = "bert."
    t = lambda n: w[p + n].astype(np.float64)
    n = len(ids)
    x = t("embeddings.word_embeddings.weight")[ids]
    x = x + t("embeddings.position_embeddings.weight")[:n]
    x = x + t("embeddings.token_type_embeddings.weight")[0]
    eps = cfg["layer_norm_eps"]
    x = layer_norm(x, t("embeddings.LayerNorm.weight"), t("embeddings.LayerNorm.bias"), eps)
    heads = cfg["num_attention_heads"]
    d = cfg["hidden_size"] // heads
    lin = lambda h, name: h @ t(name + ".weight").T + t(name + ".bias")
    for i in range(cfg["num_hidden_layers"]):
        L = f"encoder.layer.{i}."
        q = lin(x, L + "attention.self.query").reshape(n, heads, d).transpose(1, 0, 2)
        k = lin(x, L + "attention.self.key").reshape(n, heads, d).transpose(1, 0, 2)
        v = lin(x, L + "attention.self.value").reshape(n, heads, d).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        ctx = (s @ v).transpose(1, 0, 2).reshape(n, heads * d)
        a = lin(ctx, L + "attention.output.dense")
        x = layer_norm(a + x, t(L + "attention.output.LayerNorm.weight"), t(L + "attention.output.LayerNorm.bias"), eps)
        h = gelu(lin(x, L + "intermediate.dense"))
        o = lin(h, L + "output.dense")
        x = layer_norm(o + x, t(L + "output.LayerNorm.weight"), t(L + "output.LayerNorm.bias"), eps)
    # One unpadded sentence: every mask entry is 1, so the masked mean is the plain mean.
    m = x.mean(0)
    return m / max(np.linalg.norm(m), 1e-12)


def main():
    d = sys.argv[1]
    cfg = json.load(open(f"{d}/config.json"))
    w = load_file(f"{d}/model.safetensors")
    tok = Tokenizer.from_file(f"{d}/tokenizer.json")
    tok.no_padding()
    tok.enable_truncation(256)
    items = []
    for s in TEXTS:
        ids = tok.encode(s).ids
        e = embed(w, cfg, ids)
        items.append({"text": s, "token_ids": ids, "embedding": [round(float(v), 7) for v in e]})
    print(json.dumps({
        "model": "sentence-transformers/all-MiniLM-L6-v2 (catalog id all-minilm-l6-v2)",
        "how": "data/reference/all_minilm_reference.py: numpy float64 BERT forward, mean pooling, L2 norm",
        "items": items,
    }))


if __name__ == "__main__":
    main()
