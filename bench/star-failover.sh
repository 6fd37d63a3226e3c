#!/usr/bin/env bash
# Star-topology failover time (issue #18, item 3: target under 3 s with the
# default advert timing). Real `slm-swarm` processes on loopback with tiny
# models: g1 (preferred gateway, the only bootstrap), g2 (cloud-capable) and n3,
# g2 and n3 told of g1 only. Each run starts a fresh star, waits until n3 has
# dialled g2 on its own, kill -9s g1 at a random point of its advert period and
# times kill → n3's `GET /v1/swarm/gateway` naming g2 (polled every 50 ms).
# Prints each run and the median.
#
#   bench/star-failover.sh
#   env: RUNS=5 CARGO_TARGET_DIR=… (the release build is reused)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."
cargo build --release -p swarm-node --bin slm-swarm >&2
SLM_FAILOVER_RUNS="${RUNS:-5}" cargo test --release -p swarm-tests --test mesh -- \
  --ignored --exact star_failover_timing --nocapture --test-threads 1 2>&1 \
  | grep -E '^(run [0-9]+:|star failover)'
