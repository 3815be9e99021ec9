"""BERT encoder forward (MiniLM-L6 sentence embeddings) as pure functions over a params tree.

The params tree (built from safetensors by `fpe_jax.data.minilm.load_minilm`), all weights
laid out [d_in, d_out] (y = x @ w) and the six encoder layers stacked on a leading axis:

  {"embeddings": {"word": [vocab, d], "position": [max_pos, d], "token_type": [types, d],
                  "ln": {"scale": [d], "bias": [d]}},
   "layers": {"query" | "key" | "value" | "attn_out": {"w": [L, d, d], "b": [L, d]},
              "attn_ln" | "ffn_ln": {"scale": [L, d], "bias": [L, d]},
              "ffn_in": {"w": [L, d, d_ff], "b": [L, d_ff]},
              "ffn_out": {"w": [L, d_ff, d], "b": [L, d]}}}

Post-LayerNorm BERT (as in Devlin et al. and Hugging Face's BertModel): x = LN(x + attn(x)),
x = LN(x + ffn(x)), with the exact erf GELU. Padding is handled with an attention mask:
padded keys get zero attention weight and padded positions are left out of the mean pool,
so a sentence's embedding does not depend on how far its batch is padded.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

# A large finite negative (not -inf) keeps softmax NaN-free for all-padding rows.
_MASKED_SCORE = -1e30


class BertConfig(NamedTuple):
  """Static hyperparameters that the params tree's shapes do not carry.

  Attributes:
    num_heads: attention heads per layer (the hidden size must be divisible by it).
    layer_norm_eps: LayerNorm epsilon (1e-12 in BERT).
  """
  num_heads: int = 12
  layer_norm_eps: float = 1e-12


# MiniLM-L6's values, the default wherever a config is taken.
MINILM_CONFIG = BertConfig()


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """LayerNorm over the last axis. x: [..., d]; scale, bias: [d]."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def _dense(x: jax.Array, p: dict) -> jax.Array:
  return x @ p["w"] + p["b"]


def _self_attention(x: jax.Array, layer: dict, key_mask: jax.Array,
                    num_heads: int) -> jax.Array:
  """Multi-head self-attention. x: [batch, seq, d]; key_mask: [batch, seq] bool."""
  batch, seq, d = x.shape
  head_dim = d // num_heads

  def heads(t):  # [batch, seq, d] -> [batch, heads, seq, head_dim]
    return t.reshape(batch, seq, num_heads, head_dim).transpose(0, 2, 1, 3)

  q = heads(_dense(x, layer["query"]))
  k = heads(_dense(x, layer["key"]))
  v = heads(_dense(x, layer["value"]))
  scores = jnp.einsum("bhqe,bhke->bhqk", q, k) / jnp.sqrt(jnp.float32(head_dim))
  scores = jnp.where(key_mask[:, None, None, :], scores, _MASKED_SCORE)
  weights = jax.nn.softmax(scores, axis=-1)
  context = jnp.einsum("bhqk,bhke->bhqe", weights, v)
  context = context.transpose(0, 2, 1, 3).reshape(batch, seq, d)
  return _dense(context, layer["attn_out"])


def _encoder_layer(x: jax.Array, layer: dict, key_mask: jax.Array,
                   config: BertConfig) -> jax.Array:
  """One post-LN transformer block. x: [batch, seq, d]."""
  eps = config.layer_norm_eps
  attn = _self_attention(x, layer, key_mask, config.num_heads)
  x = layer_norm(x + attn, layer["attn_ln"]["scale"], layer["attn_ln"]["bias"], eps)
  hidden = jax.nn.gelu(_dense(x, layer["ffn_in"]), approximate=False)
  ffn = _dense(hidden, layer["ffn_out"])
  return layer_norm(x + ffn, layer["ffn_ln"]["scale"], layer["ffn_ln"]["bias"], eps)


def bert_encode(params: dict, token_ids: jax.Array, attention_mask: jax.Array,
                config: BertConfig = MINILM_CONFIG) -> jax.Array:
  """Last hidden state of the BERT encoder.

  Args:
    params: the params tree described in the module docstring.
    token_ids: [batch, seq] int token ids (padding ids are arbitrary; they are masked).
    attention_mask: [batch, seq], 1 for real tokens and 0 for padding.
    config: static hyperparameters.

  Returns:
    [batch, seq, d] float32 hidden states (rows at padded positions are meaningless).
  """
  emb = params["embeddings"]
  seq = token_ids.shape[1]
  if seq > emb["position"].shape[0]:
    raise ValueError(f"token_ids: sequence length {seq} exceeds the model's "
                     f"{emb['position'].shape[0]} positions")
  # Single-segment inputs: token type 0 everywhere.
  x = emb["word"][token_ids] + emb["position"][:seq][None] + emb["token_type"][0]
  x = layer_norm(x, emb["ln"]["scale"], emb["ln"]["bias"], config.layer_norm_eps)
  key_mask = attention_mask.astype(bool)

  def step(h, layer):
    return _encoder_layer(h, layer, key_mask, config), None

  # Layers are stacked on axis 0: one scanned block compiles once instead of six times.
  x, _ = jax.lax.scan(step, x, params["layers"])
  return x


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Mean over real (non-padding) tokens. hidden: [batch, seq, d]; mask: [batch, seq]."""
  mask = attention_mask.astype(hidden.dtype)[..., None]
  total = jnp.sum(hidden * mask, axis=1)
  # All-padding rows (used to fill a fixed-size batch) give zeros instead of NaN.
  count = jnp.maximum(jnp.sum(mask, axis=1), 1.0)
  return total / count


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows scaled to unit L2 norm. x: [batch, d]."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def sentence_embedding(params: dict, token_ids: jax.Array, attention_mask: jax.Array,
                       config: BertConfig = MINILM_CONFIG) -> jax.Array:
  """Sentence-transformers embedding: mean-pooled last hidden state, L2-normalised.

  Args:
    params: the params tree described in the module docstring.
    token_ids: [batch, seq] int token ids.
    attention_mask: [batch, seq], 1 for real tokens and 0 for padding.
    config: static hyperparameters.

  Returns:
    [batch, d] unit-norm embeddings (all-padding rows are zero).
  """
  hidden = bert_encode(params, token_ids, attention_mask, config)
  return l2_normalize(mean_pool(hidden, attention_mask))
