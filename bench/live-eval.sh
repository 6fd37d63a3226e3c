#!/usr/bin/env bash
# The routed swarm measured live (docs/evaluation.md): a cloud stand-in
# (`serve`, key required) and three swarm nodes on loopback, all with the same
# routing config (thresholds and Platt parameters from `calibrate
# --write-config`); node-1 is the gateway. `eval` spreads the questions over
# the three nodes round-robin, as `calibrate` averages over coordinator seats.
#
#   bench/live-eval.sh ROUTING.toml DATASET [eval flags…]
#   bench/live-eval.sh data/eval-cache/arc_easy.routing.toml arc_easy --limit 300 \
#       --cache data/eval-cache/arc_easy__live-swarm.jsonl
#
# Knobs: BIN, MODELS (three swarm models), CLOUD, THREADS (per process, 1),
# LOGS (process logs, default a temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n 2,13p "$0" >&2; exit 2; }
ROUTING="$1"; DATASET="$2"; shift 2
BIN="${BIN:-${CARGO_TARGET_DIR:-target}/release/slm-swarm}"
read -r -a MODELS <<< "${MODELS:-smollm2-135m gemma3-270m qwen2.5-coder-0.5b}"
CLOUD="${CLOUD:-qwen2.5-coder-1.5b}"
THREADS="${THREADS:-1}"
LOGS="${LOGS:-$(mktemp -d)}"; mkdir -p "$LOGS"
[ -x "$BIN" ] || { echo "no slm-swarm binary at $BIN" >&2; exit 1; }
[ -f "$ROUTING" ] || { echo "no routing config $ROUTING" >&2; exit 1; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
KEY="live-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
ns="live-$$"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT

cport=$(port)
SLM_SWARM_LIVE_KEY="$KEY" "$BIN" serve --model "$CLOUD" --http "127.0.0.1:$cport" --name cloud-stand-in \
  --api-key-env SLM_SWARM_LIVE_KEY --request-log "$LOGS/cloud-requests.jsonl" \
  --threads "$THREADS" > "$LOGS/cloud.log" 2>&1 &
pids+=($!)
# node-1 may call the cloud (a CPU stand-in needs a long deadline).
{ cat "$ROUTING"; printf '\n[cloud]\ntimeout_ms = 120000\nprobe_interval_ms = 1000\n'; } > "$LOGS/node-1.toml"
urls=(); boot=()
for i in 0 1 2; do
  name="node-$((i + 1))"
  hp=$(port); qp=$(port)
  cfg="$ROUTING"; extra=(); envk=()
  if [ $i -eq 0 ]; then
    cfg="$LOGS/node-1.toml"
    envk=(SLM_SWARM_LIVE_KEY="$KEY")
    extra=(--cloud-url "http://127.0.0.1:$cport/v1" --cloud-model "$CLOUD" --cloud-key-env SLM_SWARM_LIVE_KEY)
  fi
  # Each node dials every earlier one (nodes do not dial peers heard of by gossip).
  b=(); for x in "${boot[@]}"; do b+=(--bootstrap "$x"); done
  # Only the stand-in and node-1 ever hold the key.
  env "${envk[@]}" "$BIN" start --name "$name" --model "${MODELS[$i]}" --http "127.0.0.1:$hp" \
    --listen "/ip4/127.0.0.1/udp/$qp/quic-v1" --no-mdns --namespace "$ns" \
    --identity "$LOGS/$name.key" --threads "$THREADS" --config "$cfg" \
    "${extra[@]}" "${b[@]}" > "$LOGS/$name.log" 2>&1 &
  pids+=($!)
  urls+=("http://127.0.0.1:$hp"); boot+=("/ip4/127.0.0.1/udp/$qp/quic-v1")
done
echo "logs in $LOGS; waiting for the swarm and its gateway…" >&2
for _ in $(seq 1 300); do
  ok=1
  for u in "${urls[@]}"; do
    g=$(curl -sf "$u/v1/swarm/gateway" 2>/dev/null || true)
    case "$g" in *peer_id*) ;; *) ok=0 ;; esac
  done
  [ $ok -eq 1 ] && break
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || { echo "a process died; see $LOGS" >&2; exit 1; }; done
  sleep 1
done
[ $ok -eq 1 ] || { echo "no gateway after 300 s; see $LOGS" >&2; exit 1; }
n=(); for u in "${urls[@]}"; do n+=(--node "$u"); done
"$BIN" eval "${n[@]}" --file "data/eval/$DATASET.jsonl" "$@"
chat=$(grep -c '"path":"/v1/chat/completions"' "$LOGS/cloud-requests.jsonl" 2>/dev/null || true)
echo "cloud stand-in: ${chat:-0} chat completions (the escalations), besides reachability probes" >&2
