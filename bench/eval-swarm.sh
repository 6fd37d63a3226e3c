#!/usr/bin/env bash
# Per-question evaluation caches for docs/evaluation.md: each swarm model
# directly (`eval --model`) and the cloud stand-in through `serve` with the
# gateway's cloud prompt (`eval --node … --cloud-prompt`), over the first N
# questions of each dataset. Caches resume, so an interrupted run continues.
#
#   bench/eval-swarm.sh                      # everything (hours on 2 cores)
#   MODELS="smollm2-135m" DATASETS="arc_easy" bench/eval-swarm.sh
#   MODELS="" CLOUD=qwen2.5-coder-1.5b bench/eval-swarm.sh   # cloud only
#
# Knobs: BIN (slm-swarm binary), OUT (cache dir, default data/eval-cache),
# N (questions per dataset, 300), THREADS (per model, 1), DATASETS, MODELS,
# CLOUD (empty = skip), CLOUD_PORT.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-${CARGO_TARGET_DIR:-target}/release/slm-swarm}"
OUT="${OUT:-data/eval-cache}"
N="${N:-300}"
THREADS="${THREADS:-1}"
DATASETS="${DATASETS:-arc_easy sciq sst2 nq_open}"
MODELS="${MODELS-smollm2-135m gemma3-270m qwen2.5-coder-0.5b}"
CLOUD="${CLOUD-qwen2.5-coder-1.5b}"
CLOUD_PORT="${CLOUD_PORT:-9100}"
mkdir -p "$OUT"
[ -x "$BIN" ] || { echo "no slm-swarm binary at $BIN (cargo build --release, or set BIN)" >&2; exit 1; }

for ds in $DATASETS; do
  for m in $MODELS; do
    "$BIN" eval --model "$m" --file "data/eval/$ds.jsonl" --limit "$N" --threads "$THREADS" \
      --cache "$OUT/${ds}__$m.jsonl" --out "$OUT/${ds}__$m.report.json"
  done
done

if [ -n "$CLOUD" ]; then
  "$BIN" serve --model "$CLOUD" --http "127.0.0.1:$CLOUD_PORT" --name cloud-stand-in \
    --threads "$THREADS" > "$OUT/.serve.log" 2>&1 &
  serve_pid=$!
  trap 'kill $serve_pid 2>/dev/null || true' EXIT
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$CLOUD_PORT/v1/models" >/dev/null 2>&1 && break
    kill -0 $serve_pid 2>/dev/null || { cat "$OUT/.serve.log" >&2; exit 1; }
    sleep 1
  done
  for ds in $DATASETS; do
    "$BIN" eval --node "http://127.0.0.1:$CLOUD_PORT" --cloud-prompt --node-model "$CLOUD" \
      --file "data/eval/$ds.jsonl" --limit "$N" \
      --cache "$OUT/${ds}__cloud-$CLOUD.jsonl" --out "$OUT/${ds}__cloud-$CLOUD.report.json"
  done
fi
