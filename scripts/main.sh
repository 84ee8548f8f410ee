#!/usr/bin/env bash
# The main job on the embedded default model: sets up .venv, then runs `alignkit quickstart`.
# Extra arguments are passed on, e.g. `bash scripts/main.sh n_samples=4 fresh=true`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# An explicit (empty) extras argument: without one, `source` hands setup-env.sh this script's own arguments.
source "$ROOT/scripts/setup-env.sh" ""
exec "$VENV/bin/alignkit" quickstart "$@"
