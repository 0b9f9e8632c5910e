#!/usr/bin/env bash
# Start-up time and idle memory of the EPP per tokenizer backend (issue 14): for each fixture and
# DYN_TOKENIZER value, runs alternated, the time from exec to the "dynamo-epp serving" log line
# (the model is loaded and every warm-up done by then), the CPU time the process spent until
# then (all its threads; steadier than the wall time on a shared machine), and VmRSS once the
# process has idled STARTUP_RSS_SETTLE_SECS (default 12: past jemalloc's 10 s decay of the
# load's garbage).
#
#   cargo build --release && scripts/measure_startup.sh [runs]     (default 3 runs per cell)
#
# Needs data/tokenizers (scripts/setup.sh). EPP_BIN overrides the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${EPP_BIN:-target/release/dynamo-epp}
runs=${1:-3}
settle=${STARTUP_RSS_SETTLE_SECS:-12}
fixtures=${TOKENIZER_FIXTURES:-data/tokenizers}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf 'workers:\n  - name: w0\n    address: 127.0.0.1:1\n' >"$tmp/workers.yaml"
port=$((20000 + RANDOM % 20000))

tick=$(getconf CLK_TCK)
one() { # model backend → "seconds cpu_seconds rss_mib"
  local log="$tmp/$1.$2.$RANDOM.log" start pid t cpu
  : >"$log"
  start=$(date +%s.%N)
  env -i PATH="$PATH" RUST_LOG=info DYN_MODEL_PATH="$fixtures/$1" DYN_TOKENIZER="$2" \
    DYN_EPP_WORKERS_FILE="$tmp/workers.yaml" DYN_EPP_BIND_ADDRESS=127.0.0.1 \
    DYN_EPP_GRPC_PORT=$port DYN_EPP_HEALTH_PORT=$((port + 1)) DYN_EPP_METRICS_PORT=$((port + 2)) \
    "$bin" >"$log" 2>&1 &
  pid=$!
  until grep -q "dynamo-epp serving" "$log"; do
    kill -0 $pid 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.01
  done
  t=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
  # utime + stime (fields 14, 15; the command name in field 2 has no spaces here).
  cpu=$(awk -v hz="$tick" '{ print ($14 + $15) / hz }' /proc/$pid/stat)
  sleep "$settle"
  rss=$(awk '/^VmRSS/ {print int($2 / 1024)}' /proc/$pid/status)
  kill $pid
  wait $pid 2>/dev/null || true
  printf '%.2f s (cpu %.2f s) %d MiB' "$t" "$cpu" "$rss"
}

for model in qwen3 llama3_1; do
  for run in $(seq "$runs"); do
    for backend in default fastokens epp auto; do
      echo "$model $backend run $run: $(one $model $backend)"
    done
  done
done
