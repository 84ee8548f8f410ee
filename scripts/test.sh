#!/usr/bin/env bash
# The test suite: sets up .venv with the test extras, then the linter, then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not smollm"`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup-env.sh" test
cd "$ROOT"
echo "[test] ruff check" >&2
"$VENV/bin/ruff" check src tests benchmarks
echo "[test] pytest" >&2
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
