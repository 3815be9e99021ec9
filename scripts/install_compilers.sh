#!/usr/bin/env bash
# Installs the compile-only accelerator compilers that tests/test_kernels_compile.py runs
# on a CPU-only machine (../shared/docs/hardware.md), each the one of the installed jax,
# under $FPE_JAX_COMPILERS/jax-<version> (default ~/.cache/fpe_jax/compilers), so that
# environments with different jax versions (3.11 + jax 0.10, 3.12 + jax 0.12) each have
# their own:
#   libtpu/  libtpu, the version jax's `tpu` extra pins (about 700 MB);
#   cuda/    jax-cuda13-plugin and jax-cuda13-pjrt of jax's version (about 500 MB; XLA:GPU
#            with Triton and Mosaic GPU, enough to compile for an H200 without CUDA or a
#            GPU; CUDA 13 is what the GPU hosts run).
# Each goes into its own folder, not the Python environment: an importable libtpu or CUDA
# plugin makes every CPU-only `import jax` probe for devices and print warnings. The tests
# point TPU_LIBRARY_PATH at libtpu and put cuda/ on a subprocess's PYTHONPATH.
# Idempotent. PYTHON names the environment's interpreter (default python3).
set -euo pipefail

PY="${PYTHON:-python3}"

LIBTPU="$("$PY" - <<'PY'
import importlib.metadata as m
pins = [r.split(";")[0].strip() for r in m.requires("jax") or []
        if r.startswith("libtpu") and 'extra == "tpu"' in r]
print(pins[0] if pins else "")
PY
)"
JAX_VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("jax"))')"
ROOT="${FPE_JAX_COMPILERS:-$HOME/.cache/fpe_jax/compilers}/jax-$JAX_VERSION"
if [ -z "$LIBTPU" ]; then
  echo "[install_compilers] the installed jax $JAX_VERSION pins no libtpu (its tpu extra)" >&2
  exit 1
fi

# install FOLDER SPEC...: pip --target into FOLDER.tmp, then rename (a kill leaves no half).
install() {
  local folder="$ROOT/$1"; shift
  if [ -f "$folder/.spec" ] && [ "$(cat "$folder/.spec")" = "$*" ]; then
    echo "[install_compilers] $* already in $folder"
    return
  fi
  echo "[install_compilers] $* -> $folder"
  rm -rf "$folder.tmp"
  "$PY" -m pip install -q --no-deps --target "$folder.tmp" "$@"
  echo "$*" > "$folder.tmp/.spec"
  rm -rf "$folder"
  mv "$folder.tmp" "$folder"
}

install libtpu "$LIBTPU"
install cuda "jax-cuda13-plugin==$JAX_VERSION" "jax-cuda13-pjrt==$JAX_VERSION"
echo "[install_compilers] done"
