"""Score mcq questions with llama.cpp the way slm-swarm's continuation scorer does.

Context "Question: {q}\nAnswer:", each option " {text}" as its continuation,
score = log-likelihood / (bytes of the option + 1), pick the argmax. The
reference implementation's accuracy on the same questions, to tell numerical
noise in our kernels from accuracy lost (issue #8).

    ~/.cache/slm-swarm/llama-venv/bin/python bench/arc-llamacpp.py \
        MODEL.gguf data/eval/arc_easy.jsonl 200 picks.json

The venv is the one bench/compare-llamacpp.sh installs. picks.json holds, per
question, id, pick, answer and the option scores.
"""
import json
import sys

import numpy as np
from llama_cpp import Llama

if len(sys.argv) != 5:
    sys.exit(__doc__)
path, file, limit, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
llm = Llama(model_path=path, n_ctx=1024, n_threads=2, logits_all=True, verbose=False)
def tok(s, bos):
    return llm.tokenize(s.encode(), add_bos=bos, special=False)
right = 0
rows = []
qs = [json.loads(l) for l in open(file)][:limit]
for q in qs:
    ctx = f"Question: {q['question'].strip()}\nAnswer:"
    cids = tok(ctx, True)
    scores = []
    for c in q["choices"]:
        t = c["text"].strip()
        full = tok(ctx + " " + t, True)
        ids = full[len(cids):] if len(full) > len(cids) and full[:len(cids)] == cids else tok(" " + t, False)
        llm.reset()
        llm.eval(cids + ids)
        lg = np.array(llm.scores[len(cids) - 1 : len(cids) - 1 + len(ids)], dtype=np.float64)
        lg = lg - lg.max(axis=1, keepdims=True)
        lp = lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))
        s = sum(lp[i, ids[i]] for i in range(len(ids)))
        scores.append(s / (len(t.encode()) + 1))
    pick = q["choices"][int(np.argmax(scores))]["label"]
    right += pick == q["answer"]
    rows.append({"id": q["id"], "pick": pick, "answer": q["answer"], "scores": scores})
json.dump(rows, open(out, "w"))
print(f"{path}: {right}/{len(qs)} = {100*right/len(qs):.1f}%")
