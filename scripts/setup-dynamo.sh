#!/usr/bin/env bash
# Installs, idempotently, the real NVIDIA Dynamo 1.6.1 components the interop tests
# (tests/interop_dynamo.rs) run against: `dynamo.frontend` (the sidecar, --router-mode direct) and
# `dynamo.mocker` workers, in their own venv (.venv-dynamo) so Dynamo's pins never meet the project
# venv (which holds nats-server, scripts/setup.sh).
#
# `pip install ai-dynamo==1.6.1` cannot work here: it depends on `aisimulate`, a stub that
# downloads its payload from outside the package registries. So ai-dynamo goes in with
# --no-deps, and beside it only what the frontend and the mocker import (found by running
# both: packaging, pyyaml, msgspec; ai-dynamo-runtime brings pydantic and uvloop).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-dynamo
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# --no-compile halves the install (~30 s instead of ~65 s); Python compiles on first import.
pip=("$venv/bin/pip" install --disable-pip-version-check -q --no-compile)

if ! "$venv/bin/python" - 2>/dev/null <<'EOF'
import importlib.metadata as m
assert m.version("ai-dynamo") == "1.6.1" and m.version("ai-dynamo-runtime") == "1.6.1"
import yaml, msgspec, packaging  # noqa: F401  (imported by dynamo.frontend / dynamo.mocker)
EOF
then
  "${pip[@]}" --no-deps "ai-dynamo==1.6.1"
  # pip's resolver then lists ai-dynamo's uninstalled requirements on stderr; expected, so kept
  # out of the log unless the step fails.
  log=$(mktemp)
  "${pip[@]}" "ai-dynamo-runtime==1.6.1" "packaging==26.4" "pyyaml==6.0.4" "msgspec==0.22.0" 2>"$log" \
    || { cat "$log" >&2; exit 1; }
  rm -f "$log"
fi
echo "dynamo: $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("ai-dynamo"))')"
