#!/usr/bin/env bash
# The tests again on the newest jax the project supports (setup.cfg: jax<0.13; the version
# is pinned below), on Python 3.12 (jax 0.11 and later install on Python 3.12+ only; the
# GPU hosts run 3.12), in a virtualenv of its own with its own data readers and
# compilers: the library, kernel and deviceless-compile tests (`-m "not end_to_end"`, and
# not test_common.py). The binaries' end-to-end suites run on the default Python only, to
# keep CI short (README).
# Idempotent. PYTHON312 names the interpreter (default: pyenv's 3.12, else python3.12).
set -euo pipefail
cd "$(dirname "$0")/.."

# The first candidate that really is a working Python 3.12 (pyenv's shim on PATH may not be).
PY312=""
for candidate in "${PYTHON312:-}" "$HOME"/.pyenv/versions/3.12*/bin/python python3.12; do
  if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' \
      2>/dev/null; then
    PY312="$candidate"
    break
  fi
done
if [ -z "$PY312" ]; then
  echo "error: no Python 3.12 found: install it (pyenv install 3.12) or set PYTHON312" >&2
  exit 1
fi
VENV="${FPE_JAX_VENV312:-$HOME/.cache/fpe_jax/venv-py312}"
[ -x "$VENV/bin/python" ] || "$PY312" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# The newest jax whose whole toolchain the registry has: jax 0.12.1 pins libtpu 0.0.53,
# which is not there yet (its install_compilers.sh step fails), so the job stays on the
# release it was tested on. Move the pin when the newer release's libtpu lands.
NEWEST_JAX="${FPE_JAX_NEWEST:-0.12.0.1}"
"$VENV/bin/python" -m pip install -q -e ".[test,data]" "jax==$NEWEST_JAX" "jaxlib==$NEWEST_JAX"
PYTHON="$VENV/bin/python" bash scripts/install_data.sh
PYTHON="$VENV/bin/python" bash scripts/install_compilers.sh
"$VENV/bin/python" -c 'import jax, sys; print(f"[test_newest_jax] Python {sys.version.split()[0]}, jax {jax.__version__}")'
# tests/test_common.py is left out too: the binaries' run-directory plumbing (pure Python
# and orbax, the same versions in both environments), whose Ctrl-C and full-disk tests
# start binaries end to end.
"$VENV/bin/python" -m pytest -q -n "${FPE_JAX_TEST_WORKERS:-2}" --dist loadfile \
  -m "not end_to_end" --ignore=tests/test_common.py
