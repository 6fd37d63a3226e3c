#!/usr/bin/env bash
# Side-by-side speed of llama.cpp and slm-swarm on the same GGUF, threads and
# prompt/generation lengths. Installs llama.cpp's Python binding into a venv
# on first use (it compiles llama.cpp: ~10 minutes on two cores).
#
#   bench/compare-llamacpp.sh [MODEL_ID …]      (default: the three swarm models)
#   env: THREADS=2 RUNS=5 GEN=64 PROMPTS="32 256" SLM_SWARM=path/to/slm-swarm
#
# Runs alternate (llama.cpp, slm-swarm, llama.cpp, …) so a change in machine
# load hits both; each figure is the median of RUNS runs, ratio = slm-swarm / llama.cpp.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
home="${SLM_SWARM_HOME:-$HOME/.cache/slm-swarm}"
venv="$home/llama-venv"
threads="${THREADS:-2}"; runs="${RUNS:-5}"; gen="${GEN:-64}"; prompts="${PROMPTS:-32 256}"
slm="${SLM_SWARM:-${CARGO_TARGET_DIR:-$here/../target}/release/slm-swarm}"
[ -x "$slm" ] || { echo "no slm-swarm binary at $slm: cargo build --release (or set SLM_SWARM)" >&2; exit 1; }
if ! "$venv/bin/python" -c "import llama_cpp, numpy" 2>/dev/null; then
  echo "installing llama-cpp-python into $venv (compiles llama.cpp)…" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q llama-cpp-python==0.3.36 numpy
fi
models=("$@"); [ ${#models[@]} -gt 0 ] || models=(smollm2-135m gemma3-270m qwen2.5-coder-0.5b)
"$slm" models pull "${models[@]}" >&2
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
printf '%-20s %6s %12s %12s %7s %12s %12s %7s\n' model prompt llama_pre slm_pre ratio llama_dec slm_dec ratio
for id in "${models[@]}"; do
  path=$("$slm" models list --json | python3 -c "import json,sys; print(next(m['path'] for m in json.load(sys.stdin) if m['id']=='$id'))")
  for p in $prompts; do
    lp=(); ld=(); sp=(); sd=()
    for _ in $(seq "$runs"); do
      j=$("$venv/bin/python" "$here/llamacpp_bench.py" --model "$path" --threads "$threads" --prompt-tokens "$p" --gen-tokens "$gen" --runs 1 2>/dev/null)
      lp+=("$(field prefill_tok_s <<<"$j")"); ld+=("$(field decode_tok_s <<<"$j")")
      j=$("$slm" bench --model "$path" --threads "$threads" --prompt-tokens "$p" --gen-tokens "$gen" --runs 1 --json 2>/dev/null)
      sp+=("$(field prefill_tok_s <<<"$j")"); sd+=("$(field decode_tok_s <<<"$j")")
    done
    a=$(printf '%s\n' "${lp[@]}" | median); b=$(printf '%s\n' "${sp[@]}" | median)
    c=$(printf '%s\n' "${ld[@]}" | median); d=$(printf '%s\n' "${sd[@]}" | median)
    printf '%-20s %6s %12.1f %12.1f %7.2f %12.1f %12.1f %7.2f\n' "$id" "$p" "$a" "$b" "$(echo "$b/$a" | bc -l)" "$c" "$d" "$(echo "$d/$c" | bc -l)"
  done
done
