#!/usr/bin/env bash
# Screenshot of the web page (docs/img/ui.png) with a real 3-node swarm on
# loopback: smollm2-135m (cloud-capable, so it becomes the gateway), gemma3-270m
# and qwen2.5-coder-0.5b, a cloud stand-in, and a few questions asked first so
# the feed and the chart have something to show. Needs chromium.
#   bench/ui-screenshot.sh [OUT.png]
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(realpath -m "${1:-docs/img/ui.png}")"
bin="${SLM_SWARM_BIN:-${CARGO_TARGET_DIR:-target}/release/slm-swarm}"
tmp="$(mktemp -d)"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
ns="ui-shot-$$"

"$bin" serve --model qwen2.5-coder-0.5b --http 127.0.0.1:18190 >"$tmp/cloud.log" 2>&1 &
pids+=($!)
node() { # name model http [extra…]
  local name=$1 model=$2 http=$3; shift 3
  "$bin" start --name "$name" --model "$model" --http "127.0.0.1:$http" --namespace "$ns" \
    --listen /ip4/127.0.0.1/udp/0/quic-v1 --no-mdns --threads 1 --advert-interval 500ms \
    --identity "$tmp/$name.key" "$@" >"$tmp/$name.log" 2>&1 &
  pids+=($!)
}
node office-server smollm2-135m 18181 --cloud-url http://127.0.0.1:18190/v1 --cloud-model qwen2.5-coder-0.5b
for _ in $(seq 100); do grep -q '^listening' "$tmp/office-server.log" 2>/dev/null && break; sleep 0.2; done
boot="$(grep -m1 '^listening: /ip4/127.0.0.1' "$tmp/office-server.log" | cut -d' ' -f2)"
node laptop gemma3-270m 18182 --bootstrap "$boot"
node pi-board qwen2.5-coder-0.5b 18183 --bootstrap "$boot"
for _ in $(seq 150); do
  n=$(curl -s 127.0.0.1:18181/v1/swarm/peers | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["peers"]))' 2>/dev/null || echo 0)
  g=$(curl -s 127.0.0.1:18181/v1/swarm/gateway | python3 -c 'import json,sys; print(json.load(sys.stdin)["peer_id"] or "")' 2>/dev/null || true)
  [ "$n" = 2 ] && [ -n "$g" ] && break
  sleep 0.2
done
ask() { "$bin" query --node http://127.0.0.1:18181 --no-stream --max-tokens 24 "$@" >/dev/null || true; }
ask "Which of these is a mammal? A. shark B. dolphin C. trout D. eel"
ask --route vote "What is the boiling point of water at sea level in Celsius?"
ask --route vote "Is this review positive or negative? 'A wonderful, moving film.'"
ask "Write a Python function that reverses a string."
ask --route cloud "Which planet is known as the Red Planet?"
ask "What gas do plants take in for photosynthesis? A. oxygen B. carbon dioxide C. nitrogen D. helium"
sleep 1
chromium --headless=new --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$tmp/profile" --window-size=1400,1250 --timeout=5000 \
  --screenshot="$out" http://127.0.0.1:18181/ 2>/dev/null || true
[ -s "$out" ] || { echo "no screenshot written" >&2; exit 1; }
echo "wrote $out"
