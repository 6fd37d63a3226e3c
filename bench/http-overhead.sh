#!/usr/bin/env bash
# A confident local short answer through the node's HTTP API against a bare
# `slm-swarm generate` of the same prompt (issue #8, item 5: at most 1.1×).
#
#   bench/http-overhead.sh
#   env: MODEL=smollm2-135m THREADS=2 RUNS=5 MAX_TOKENS=16 PORT=18181 SLM_SWARM=path/to/slm-swarm
#
# generate: prefill_ms + decode_ms reported by one fresh process per run (model
# load excluded). HTTP: curl's time_total of POST /v1/chat/completions with
# swarm.route = "local" to one warm node with no peers, so HTTP, JSON, the
# safety check and routing are included. Medians per prompt; ratio = HTTP / generate.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
model="${MODEL:-smollm2-135m}"; threads="${THREADS:-2}"; runs="${RUNS:-5}"
max_tokens="${MAX_TOKENS:-16}"; port="${PORT:-18181}"
slm="${SLM_SWARM:-${CARGO_TARGET_DIR:-$here/../target}/release/slm-swarm}"
[ -x "$slm" ] || { echo "no slm-swarm binary at $slm: cargo build --release (or set SLM_SWARM)" >&2; exit 1; }
command -v curl >/dev/null || { echo "curl is needed" >&2; exit 1; }
"$slm" models pull "$model" all-minilm-l6-v2 >&2
tmp=$(mktemp -d)
"$slm" start --model "$model" --http "127.0.0.1:$port" --no-mdns --threads "$threads" \
  --listen /ip4/127.0.0.1/udp/0/quic-v1 --identity "$tmp/id.key" >"$tmp/node.log" 2>&1 &
node=$!
trap 'kill $node 2>/dev/null; wait $node 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
  kill -0 $node 2>/dev/null || { cat "$tmp/node.log" >&2; exit 1; }
  sleep 0.1
done
prompts=(
  "What is the capital of France? Answer briefly."
  "What color is the sky on a clear day? Answer briefly."
  "How many legs does a spider have? Answer briefly."
  "What is the boiling point of water in Celsius? Answer briefly."
  "Who wrote Romeo and Juliet? Answer briefly."
  "What is the largest planet in the solar system? Answer briefly."
)
body() { python3 -c 'import json,sys; print(json.dumps({"model": sys.argv[1], "max_tokens": int(sys.argv[2]), "temperature": 0, "messages": [{"role": "user", "content": sys.argv[3]}], "swarm": {"route": "local"}}))' "$model" "$max_tokens" "$1"; }
post() { curl -sf -o "$tmp/resp.json" -w '%{time_total}' -H 'content-type: application/json' -d "$(body "$1")" "http://127.0.0.1:$port/v1/chat/completions"; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
post "warm-up: say hello" >/dev/null # the embedder and the engine are warm from here on
printf '%-8s %-8s %12s %10s %7s  %s\n' gen_tok http_tok generate_ms http_ms ratio prompt
sum_g=0; sum_h=0
for p in "${prompts[@]}"; do
  g=(); h=()
  for _ in $(seq "$runs"); do
    j=$("$slm" generate --model "$model" --threads "$threads" --max-tokens "$max_tokens" --json "$p" 2>/dev/null)
    g+=("$(python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["prefill_ms"]+j["decode_ms"])' <<<"$j")")
    gt=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["completion_tokens"])' <<<"$j")
    t=$(post "$p"); h+=("$(awk -v t="$t" 'BEGIN {print t * 1000}')")
    ht=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["usage"]["completion_tokens"])' "$tmp/resp.json")
  done
  mg=$(printf '%s\n' "${g[@]}" | median); mh=$(printf '%s\n' "${h[@]}" | median)
  sum_g=$(awk -v a="$sum_g" -v b="$mg" 'BEGIN {print a + b}'); sum_h=$(awk -v a="$sum_h" -v b="$mh" 'BEGIN {print a + b}')
  printf '%-8s %-8s %12.1f %10.1f %7.2f  %s\n' "$gt" "$ht" "$mg" "$mh" "$(awk -v a="$mh" -v b="$mg" 'BEGIN {print a / b}')" "$p"
done
printf 'summed: generate %.1f ms, HTTP %.1f ms, ratio %.2f\n' "$sum_g" "$sum_h" "$(awk -v a="$sum_h" -v b="$sum_g" 'BEGIN {print a / b}')"
