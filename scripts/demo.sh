#!/usr/bin/env bash
# The local demo chain: Envoy + dynamo-epp + three mock workers from deploy/demo/workers.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked --bin dynamo-epp --example demo
exec target/release/examples/demo "${1:-deploy/demo/workers.yaml}"
