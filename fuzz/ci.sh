#!/usr/bin/env bash
# Bounded fuzz run for CI: builds every cargo-fuzz target once, then runs each
# from the committed seeds for FUZZ_SECONDS (default 25). Exits non-zero if any
# target finds a crash, after printing the input (hex) so the log reproduces it.
#
# Works on a fresh machine with the stable toolchain: installs cargo-fuzz if
# missing; libFuzzer builds on stable with RUSTC_BOOTSTRAP=1 and no sanitizer.
# Cost: ~40 s to install cargo-fuzz; the instrumented build of the node crate
# and its dependencies takes ~15 min cold on 2 cores, ~1 min warm (the build
# lives in $CARGO_TARGET_DIR/x86_64-unknown-linux-gnu); then ~30 s per target.
set -euo pipefail
cd "$(dirname "$0")"

secs="${FUZZ_SECONDS:-25}"
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=never
flags=(-s none --codegen-units 16)

if ! command -v cargo-fuzz >/dev/null && [ ! -x "$HOME/.cargo/bin/cargo-fuzz" ]; then
  echo "installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi
export PATH="$HOME/.cargo/bin:$PATH"

started=$SECONDS
cargo fuzz build "${flags[@]}"
echo "fuzz build: $((SECONDS - started)) s"

failed=()
for t in $(cargo fuzz list); do
  mkdir -p "corpus/$t" "seeds/$t"
  extra=(-max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
  [ -f "dicts/$t.dict" ] && extra+=(-dict="dicts/$t.dict")
  t0=$SECONDS
  if cargo fuzz run "${flags[@]}" "$t" "corpus/$t" "seeds/$t" -- "${extra[@]}" >"corpus/$t.log" 2>&1; then
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "corpus/$t.log" | grep -o '[0-9]*$' || echo '?')
    echo "fuzz $t: ok, $runs runs in $((SECONDS - t0)) s"
  else
    echo "fuzz $t: FAILED after $((SECONDS - t0)) s"
    grep -v -E '^(#[0-9]|INFO|\s+at |\s+[0-9]+: )' "corpus/$t.log" | tail -40
    for a in artifacts/"$t"/*; do
      [ -f "$a" ] && { echo "input $a (hex):"; od -An -tx1 -v "$a" | head -64; }
    done
    failed+=("$t")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz targets failed: ${failed[*]} (reproduce: cargo fuzz run -s none TARGET FILE)"
  exit 1
fi
echo "fuzz: all targets ran ${secs} s without a finding"
