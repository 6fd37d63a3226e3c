#!/usr/bin/env bash
# Accuracy of the fast engine against the exact computation of the same model
# (issue #8: no accuracy traded for speed). For each model, `slm-swarm eval`
# answers the first LIMIT ARC-Easy questions twice:
#   ours   the packed int8 kernels (activations quantized to int8 per 32 values);
#   exact  candle's matmul on weights dequantized to f32 and f32 activations
#          (SLM_SWARM_KERNELS=candle CANDLE_DEQUANTIZE_ALL=1): the same weights
#          with no activation rounding at all, several times slower.
# and prints both accuracies and how many questions get the same pick.
#
#   bench/arc-exact.sh [MODEL_ID …]       (default: the three swarm models)
#   env: LIMIT=200 FILE=data/eval/arc_easy.jsonl SLM_SWARM=path/to/slm-swarm OUT=dir
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
limit="${LIMIT:-200}"; file="${FILE:-$here/../data/eval/arc_easy.jsonl}"
slm="${SLM_SWARM:-${CARGO_TARGET_DIR:-$here/../target}/release/slm-swarm}"
[ -x "$slm" ] || { echo "no slm-swarm binary at $slm: cargo build --release (or set SLM_SWARM)" >&2; exit 1; }
out="${OUT:-$(mktemp -d)}"; mkdir -p "$out"
models=("$@"); [ ${#models[@]} -gt 0 ] || models=(smollm2-135m gemma3-270m qwen2.5-coder-0.5b)
"$slm" models pull "${models[@]}" >&2
printf '%-20s %5s %9s %9s %10s\n' model n ours exact same_pick
for id in "${models[@]}"; do
  "$slm" eval --model "$id" --file "$file" --limit "$limit" --fresh --cache "$out/$id.ours.jsonl" --json >/dev/null
  SLM_SWARM_KERNELS=candle CANDLE_DEQUANTIZE_ALL=1 \
    "$slm" eval --model "$id" --file "$file" --limit "$limit" --fresh --cache "$out/$id.exact.jsonl" --json >/dev/null
  python3 - "$id" "$out/$id.ours.jsonl" "$out/$id.exact.jsonl" <<'PY'
import json, sys
def load(path):
    return {r["qid"]: r for r in map(json.loads, open(path))}
ours, exact = load(sys.argv[2]), load(sys.argv[3])
qs = sorted(ours.keys() & exact.keys())
acc = lambda run: 100 * sum(run[q]["correct"] for q in qs) / len(qs)
same = sum(ours[q]["answer"] == exact[q]["answer"] for q in qs)
print(f"{sys.argv[1]:20s} {len(qs):5d} {acc(ours):8.1f}% {acc(exact):8.1f}% {same:6d}/{len(qs)}")
PY
done
echo "per-question answers: $out" >&2
