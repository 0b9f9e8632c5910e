#!/usr/bin/env bash
# Regenerates tests/golden/tokenizer_parity.json.gz with Python `transformers` (the reference),
# from a scratch venv with pinned versions. Not part of CI: the golden file is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${GOLDEN_VENV:-/tmp/dynamo-epp-golden-venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --disable-pip-version-check -q "transformers==5.24.0" "tokenizers==0.23.3" "jinja2==3.1.6"
scripts/setup.sh >/dev/null # brings the tokenizer fixtures into data/tokenizers
export TOKENIZER_FIXTURES=${TOKENIZER_FIXTURES:-$PWD/data/tokenizers}
"$venv/bin/python" scripts/gen_tokenizer_golden.py
