#!/usr/bin/env bash
# The demo: nats-server (JetStream), dynamo-epp with the Qwen3 tokenizer and KV events, mock
# engines that cache prompts and publish KV events, and Envoy in front (examples/demo.rs).
#   scripts/demo.sh [AGGREGATED_FLEET] [DISAGGREGATED_FLEET]   (default: deploy/demo/*.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build --locked --quiet --bin dynamo-epp --example demo
exec "${CARGO_TARGET_DIR:-target}/debug/examples/demo" "$@"
