"""Times llama.cpp (llama-cpp-python) on a GGUF the way `slm-swarm bench` does:
prefill of a P-token prompt, then G greedy decode steps, on T threads.
Prints one JSON object: prefill_tok_s and decode_tok_s (median of runs)."""
import argparse
import json
import os
import statistics
import time

import numpy as np
from llama_cpp import Llama

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--prompt-tokens", type=int, default=32)
ap.add_argument("--gen-tokens", type=int, default=64)
ap.add_argument("--runs", type=int, default=5)
a = ap.parse_args()

llm = Llama(model_path=a.model, n_threads=a.threads, n_threads_batch=a.threads,
            n_ctx=a.prompt_tokens + a.gen_tokens + 16, n_batch=512, verbose=False)
# The prompt: the reference text, repeated to length (its content does not change the speed).
ref = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "reference", "text.txt")
text = open(ref, encoding="utf-8").read()
tokens = llm.tokenize(text.encode(), add_bos=False)
while len(tokens) < a.prompt_tokens:
    tokens += tokens
tokens = tokens[: a.prompt_tokens]

prefill, decode = [], []
for _ in range(a.runs + 1):  # the first run warms up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens)
    t1 = time.perf_counter()
    for _ in range(a.gen_tokens):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([tok])
    t2 = time.perf_counter()
    prefill.append(a.prompt_tokens / (t1 - t0))
    decode.append(a.gen_tokens / (t2 - t1))
print(json.dumps({
    "model": a.model, "threads": a.threads, "prompt_tokens": a.prompt_tokens,
    "gen_tokens": a.gen_tokens,
    "prefill_tok_s": statistics.median(prefill[1:]),
    "decode_tok_s": statistics.median(decode[1:]),
}))
