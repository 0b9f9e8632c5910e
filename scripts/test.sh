#!/usr/bin/env bash
# The full test suite: unit tests, and end-to-end tests through a real Envoy.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --locked "$@"
