#!/usr/bin/env bash
# Installs the compile-only accelerator compilers that tests/test_kernels_compile.py runs
# on a CPU-only machine (../shared/docs/hardware.md): libtpu, the one of the installed jax
# (the version its `tpu` extra pins), into $FPE_JAX_COMPILERS/libtpu (default
# ~/.cache/fpe_jax/compilers/libtpu). It goes into its own folder, not the Python
# environment: an importable libtpu makes every CPU-only `import jax` probe for TPUs and
# print warnings. The tests point TPU_LIBRARY_PATH at it. Idempotent; about 700 MB.
set -euo pipefail

ROOT="${FPE_JAX_COMPILERS:-$HOME/.cache/fpe_jax/compilers}"
PY="${PYTHON:-python3}"

SPEC="$("$PY" - <<'PY'
import importlib.metadata as m
pins = [r.split(";")[0].strip() for r in m.requires("jax") or []
        if r.startswith("libtpu") and 'extra == "tpu"' in r]
print(pins[0] if pins else "")
PY
)"
if [ -z "$SPEC" ]; then
  echo "[install_compilers] the installed jax pins no libtpu (its tpu extra)" >&2
  exit 1
fi
if [ -f "$ROOT/libtpu/.spec" ] && [ "$(cat "$ROOT/libtpu/.spec")" = "$SPEC" ] \
    && [ -f "$ROOT/libtpu/libtpu/libtpu.so" ]; then
  echo "[install_compilers] $SPEC already in $ROOT/libtpu"
  exit 0
fi
echo "[install_compilers] $SPEC -> $ROOT/libtpu"
rm -rf "$ROOT/libtpu.tmp"
"$PY" -m pip install -q --no-deps --target "$ROOT/libtpu.tmp" "$SPEC"
echo "$SPEC" > "$ROOT/libtpu.tmp/.spec"
rm -rf "$ROOT/libtpu"
mv "$ROOT/libtpu.tmp" "$ROOT/libtpu"
echo "[install_compilers] done"
