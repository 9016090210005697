#!/usr/bin/env bash
# The whole test suite: starts a real Kafka broker and schema registry (scripts/kafka.sh,
# assembled from Maven Central), installs the Python readers used for interop checks
# (pyarrow, confluent-kafka, fastavro, and PyYAML for the reference model) into a virtualenv,
# runs every Rust test, and stops what it started even when something fails.
#
#   scripts/test.sh [extra cargo test arguments]
#
# FEATURESTREAM_CACHE (default ~/.cache/featurestream) holds downloads between runs; it is a
# speed-up only: a clean machine fills it on the first run.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${FEATURESTREAM_CACHE:-$HOME/.cache/featurestream}
VENV="$CACHE/venv"

cleanup() { scripts/kafka.sh down || true; }
trap cleanup EXIT

echo "test.sh: starting Kafka and the schema registry"
scripts/kafka.sh up
eval "$(scripts/kafka.sh env)"

if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import pyarrow, confluent_kafka, fastavro, yaml' 2>/dev/null; then
  echo "test.sh: installing the Python readers into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check pyarrow confluent-kafka fastavro pyyaml
fi
export FEATURESTREAM_PYTHON="$VENV/bin/python"

echo "test.sh: running the tests"
cargo test --lib --bins --tests "$@"
