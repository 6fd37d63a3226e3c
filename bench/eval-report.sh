#!/usr/bin/env bash
# The tables of docs/evaluation.md from the caches of bench/eval-swarm.sh (each
# model alone, the cloud stand-in) and bench/live-eval.sh (the live swarm):
# runs `calibrate` per dataset (thresholds for --target-cloud, routing config,
# SVG curve, JSON) and prints one markdown table per dataset. Offline: no model
# runs here, so it takes seconds.
#
#   bench/eval-report.sh                   # all four datasets
#   DATASETS="arc_easy sciq" TARGET=0.2 bench/eval-report.sh
#
# Knobs: BIN, OUT (cache dir, data/eval-cache), DATASETS, MODELS, CLOUD,
# TARGET (cloud share, 0.2), IMG (SVG dir, docs/img).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-${CARGO_TARGET_DIR:-target}/release/slm-swarm}"
OUT="${OUT:-data/eval-cache}"
DATASETS="${DATASETS:-arc_easy sciq sst2 nq_open}"
read -r -a MODELS <<< "${MODELS:-smollm2-135m gemma3-270m qwen2.5-coder-0.5b}"
CLOUD="${CLOUD:-qwen2.5-coder-1.5b}"
TARGET="${TARGET:-0.2}"
IMG="${IMG:-docs/img}"
[ -x "$BIN" ] || { echo "no slm-swarm binary at $BIN (cargo build --release, or set BIN)" >&2; exit 1; }
mkdir -p "$IMG"
for ds in $DATASETS; do
  args=()
  for m in "${MODELS[@]}"; do args+=(--cache "$OUT/${ds}__$m.jsonl"); done
  live="$OUT/${ds}__live-swarm.jsonl"
  # A live run counts once it has finished (its report is written last).
  [ -f "$live" ] && [ -f "${live%.jsonl}.report.json" ] && args+=(--live "$live")
  "$BIN" calibrate "${args[@]}" --cloud "$OUT/${ds}__cloud-$CLOUD.jsonl" --target-cloud "$TARGET" \
    --write-config "$OUT/$ds.routing.toml" --plot "$IMG/curve-$ds.svg" --json > "$OUT/$ds.calibrate.json"
  python3 - "$OUT" "$ds" "$CLOUD" "${MODELS[@]}" <<'PY'
import json, sys
out, ds, cloud, models = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
cal = json.load(open(f"{out}/{ds}.calibrate.json"))
rep = lambda name: json.load(open(f"{out}/{ds}__{name}.report.json"))
def lat(r, route):
    l = r["latency_ms"].get(route)
    return f"{l['p50']:.0f} / {l['p95']:.0f}" if l else "–"
q = cal["questions"]
print(f"\n### {ds} ({q['fit']} fit + {q['test']} test questions)\n")
print("| system | accuracy (test half) | accuracy (all) | cloud share | latency p50 / p95 ms |")
print("|---|---|---|---|---|")
for m, mj in zip(models, cal["models"]):
    r = rep(m)
    print(f"| {m} alone | {mj['accuracy_test']:.3f} | {r['accuracy']:.3f} | 0 | {lat(r, 'local')} |")
r = rep(f"cloud-{cloud}")
ref = cal["reference"]
print(f"| cloud only ({cloud}, gateway prompt) | {ref['cloud_only']['accuracy']:.3f} | {r['accuracy']:.3f} | 1 | {lat(r, 'cloud')} |")
v = ref["vote_only"]
print(f"| swarm, every query voted, no cloud (sim.) | {v['accuracy']:.3f} | | 0 | |")
n = ref["swarm_no_cloud"]
print(f"| swarm without cloud: local or vote (sim.) | {n['accuracy']:.3f} | | 0 | |")
t = cal["thresholds"]
print(f"| **routed swarm** (sim., tau_local {t['tau_local']:.2f}, tau_vote {t['tau_vote']:.2f}) "
      f"| **{t['test']['accuracy']:.3f}** | {t['all']['accuracy']:.3f} | {t['test']['cloud_share']:.3f} (all {t['all']['cloud_share']:.3f}) | |")
live = cal.get("live")
if live:
    lr = rep("live-swarm")
    lt, la = live["test"]["live"], live["all"]["live"]
    lats = "; ".join(f"{k} {lat(lr, k)}" for k in ("local", "vote", "cloud") if k in lr["latency_ms"])
    print(f"| **routed swarm, live** (3 nodes + gateway) | **{lt['accuracy']:.3f}** | {la['accuracy']:.3f} "
          f"| {lt['cloud_share']:.3f} (all {la['cloud_share']:.3f}) | {lats} |")
print()
co = ref["cloud_only"]["accuracy"]
ratio = t["test"]["accuracy"] / co if co else float("nan")
line = f"Headline (test half): routed swarm / cloud-only = {ratio:.2f} at cloud share {t['test']['cloud_share']:.3f} (simulated)"
if live:
    line += f"; live {lt['accuracy'] / co:.2f} at {lt['cloud_share']:.3f}"
print(line + f". Best single SLM ({ref['best_single']['model']}): {ref['best_single']['accuracy']:.3f}.")
print("\nAUROC (test half) of each signal for \"this answer is right\" (* = used, chosen on the fit half):\n")
sig = ["confidence", "margin", "mean_logprob", "min_prob"]
print("| model | " + " | ".join(sig) + " |")
print("|---|" + "---|" * len(sig))
for mj in cal["models"]:
    cells = []
    for s in sig:
        a = mj["signals"].get(s, {}).get("auroc")
        cells.append("–" if a is None else f"{a:.3f}{'*' if s == mj['signal'] else ''}")
    print(f"| {mj['model']} | " + " | ".join(cells) + " |")
agr = cal["swarm"]["agreement"]["auroc"]
print(f"| vote agreement | {agr:.3f} | | | |" if agr is not None else "| vote agreement | – | | | |")
PY
done
