#!/usr/bin/env bash
# The real backends the stack tests run (tests/test_real_stack.py), built from their Go modules
# at pinned versions into a cache outside the repository, and reused while the pins are the same:
#   - the OpenTelemetry Collector with exactly the components of collector/otel-collector.yaml,
#     by the collector builder from collector/builder-config.yaml (rebuilt when it changes);
#   - Jaeger v2 (cmd/jaeger; its go.mod has replace directives, so it is built in a copy of
#     the downloaded module rather than `go install`ed);
#   - Prometheus, from Debian's package.
# Writes $cache/stack.env (the binaries' paths) for the tests. Cache: $CHATTER_OTEL_CACHE, else
# ~/.cache/chatter-otel.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${CHATTER_OTEL_CACHE:-$HOME/.cache/chatter-otel}"
bin="$cache/bin"
mkdir -p "$bin"

# Jaeger v1.76.0 is Jaeger v2.13.0 (one release, both tags; the Go module is tagged v1): the
# jaegertracing/jaeger:2.13.0 image in docker-compose.yml (tests/test_stack.py checks they agree).
JAEGER_VERSION=1.76.0
JAEGER_V2=2.13.0
collector_version="$(sed -n 's/^  version: *//p' collector/builder-config.yaml)"
manifest_key="$(sha256sum collector/builder-config.yaml | cut -c1-12)"

# Go: on PATH, else where the official tarball puts it.
command -v go >/dev/null || export PATH="$PATH:/usr/local/go/bin:$HOME/go/bin"
command -v go >/dev/null || { echo "stack-bin: Go is needed (https://go.dev/dl/)" >&2; exit 1; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
took() { echo "stack-bin: $1 built in $(( $(date +%s) - $2 )) s"; }

otelcol="$bin/otelcol-chatter-$collector_version-$manifest_key/otelcol-chatter"
if [ ! -x "$otelcol" ]; then
  start=$(date +%s)
  builder="$bin/builder-$collector_version/builder"
  if [ ! -x "$builder" ]; then
    GOBIN="$(dirname "$builder")" go install "go.opentelemetry.io/collector/cmd/builder@v$collector_version"
  fi
  work="$(mktemp -d)"
  sed "s#^  output_path: .*#  output_path: $work/out#" collector/builder-config.yaml > "$work/manifest.yaml"
  "$builder" --config "$work/manifest.yaml" > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
  mkdir -p "$(dirname "$otelcol")"
  mv "$work/out/otelcol-chatter" "$otelcol"
  rm -rf "$work"
  took "otelcol-chatter $collector_version" "$start"
fi

jaeger="$bin/jaeger-$JAEGER_VERSION/jaeger"
if [ ! -x "$jaeger" ]; then
  start=$(date +%s)
  src="$(go mod download -json "github.com/jaegertracing/jaeger@v$JAEGER_VERSION" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')"
  work="$(mktemp -d)"
  cp -r "$src" "$work/jaeger" && chmod -R u+w "$work/jaeger"
  (cd "$work/jaeger" && go build -o "$jaeger" ./cmd/jaeger)
  rm -rf "$work"
  took "jaeger $JAEGER_VERSION" "$start"
fi

if ! command -v prometheus >/dev/null; then
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
prometheus="$(command -v prometheus)"

cat > "$cache/stack.env" <<EOF
OTELCOL=$otelcol
JAEGER=$jaeger
PROMETHEUS=$prometheus
EOF
echo "stack-bin: ready ($cache/stack.env): otelcol-chatter $collector_version," \
  "jaeger $JAEGER_VERSION (v$JAEGER_V2), $("$prometheus" --version 2>&1 | head -1)"
