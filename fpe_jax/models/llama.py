"""Llama-architecture decoder as pure functions: RMSNorm, interleaved-pair RoPE, GQA, SwiGLU.

The forward matches llama.cpp's reading of a GGUF checkpoint (SmolLM2-135M here, loaded by
`fpe_jax.data.gguf_loader`): the GGUF converter permutes the Q and K projections so that RoPE
rotates adjacent pairs (2i, 2i+1) of each head, not the Hugging Face rotate-half layout.

Params are a nested dict of arrays, weights laid out [d_in, d_out] (y = x @ w):

  {"embed": [vocab, d_model],            # also the (tied) output projection
   "final_norm": [d_model],
   "blocks": {"attn_norm": [L, d_model], "wq": [L, d_model, n_heads * head_dim],
              "wk": [L, d_model, n_kv_heads * head_dim], "wv": same as wk,
              "wo": [L, n_heads * head_dim, d_model], "ffn_norm": [L, d_model],
              "w_gate": [L, d_model, d_ff], "w_up": [L, d_model, d_ff],
              "w_down": [L, d_ff, d_model]}}

Blocks are stacked (layer axis first) so the full forward is one `lax.scan`; a pipeline that
works block by block takes `block_params(params, i)` and calls `attention_sublayer` /
`ffn_sublayer` (or `ffn_inputs` to capture what the FFN linears see) itself.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Static hyperparameters of a Llama decoder (hashable: usable as a jit static argument)."""
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  rope_base: float = 10000.0
  norm_eps: float = 1e-5

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  def __post_init__(self):
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm. x: [..., d]; scale: [d]. Statistics in float32."""
  x32 = x.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * inv).astype(x.dtype) * scale


def rope_angles(seq_len: int, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
  """cos, sin of the RoPE angles, each [seq_len, head_dim // 2] (position p, pair i)."""
  inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates adjacent pairs (2i, 2i+1) of each head (GGUF / llama.cpp "normal" RoPE).

  Args:
    x: [batch, seq, heads, head_dim].
    cos, sin: [seq, head_dim // 2].

  Returns:
    [batch, seq, heads, head_dim].
  """
  x_pairs = x.reshape(*x.shape[:-1], -1, 2)
  x0, x1 = x_pairs[..., 0], x_pairs[..., 1]
  cos, sin = cos[None, :, None, :], sin[None, :, None, :]
  rotated = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return rotated.reshape(x.shape)


def attention_sublayer(cfg: LlamaConfig, block: Params, h: jax.Array) -> jax.Array:
  """Residual causal self-attention: h + Attn(RMSNorm(h)).

  Args:
    cfg: model config.
    block: one block's params (unstacked, see `block_params`).
    h: [batch, seq, d_model] residual stream.

  Returns:
    [batch, seq, d_model].
  """
  batch, seq, _ = h.shape
  hd = cfg.head_dim
  x = rms_norm(h, block["attn_norm"], cfg.norm_eps)
  q = (x @ block["wq"]).reshape(batch, seq, cfg.n_heads, hd)
  k = (x @ block["wk"]).reshape(batch, seq, cfg.n_kv_heads, hd)
  v = (x @ block["wv"]).reshape(batch, seq, cfg.n_kv_heads, hd)
  cos, sin = rope_angles(seq, hd, cfg.rope_base)
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  # Grouped-query attention: query head j reads KV head j // group.
  group = cfg.n_heads // cfg.n_kv_heads
  q = q.reshape(batch, seq, cfg.n_kv_heads, group, hd)
  scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / jnp.sqrt(jnp.asarray(hd, q.dtype))
  causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
  scores = jnp.where(causal, scores.astype(jnp.float32), -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(batch, seq, cfg.n_heads * hd)
  return h + out @ block["wo"]


def ffn_input(cfg: LlamaConfig, block: Params, h: jax.Array) -> jax.Array:
  """What gate_proj and up_proj see: RMSNorm(h) with the FFN norm. [batch, seq, d_model]."""
  return rms_norm(h, block["ffn_norm"], cfg.norm_eps)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """The down_proj input: silu(gate) * up. Shapes [..., d_ff]."""
  return jax.nn.silu(gate) * up


def dense_ffn(block: Params, x: jax.Array) -> jax.Array:
  """SwiGLU FFN without residual: (silu(x @ w_gate) * (x @ w_up)) @ w_down. x: [..., d_model]."""
  return swiglu(x @ block["w_gate"], x @ block["w_up"]) @ block["w_down"]


FfnFn = Callable[[jax.Array], jax.Array]


def ffn_sublayer(cfg: LlamaConfig, block: Params, h: jax.Array,
                 ffn: FfnFn | None = None) -> jax.Array:
  """Residual FFN: h + FFN(RMSNorm(h)).

  Args:
    cfg: model config.
    block: one block's params.
    h: [batch, seq, d_model].
    ffn: optional replacement for the dense FFN (e.g. a routed mixture of sparse experts),
      mapping the normalised input [batch, seq, d_model] to [batch, seq, d_model].

  Returns:
    [batch, seq, d_model].
  """
  x = ffn_input(cfg, block, h)
  return h + (dense_ffn(block, x) if ffn is None else ffn(x))


def block_apply(cfg: LlamaConfig, block: Params, h: jax.Array) -> jax.Array:
  """One dense decoder block. h: [batch, seq, d_model] -> [batch, seq, d_model]."""
  return ffn_sublayer(cfg, block, attention_sublayer(cfg, block, h))


def block_params(params: Params, layer: int) -> Params:
  """Block `layer`'s params, unstacked from the [L, ...] leaves."""
  return jax.tree.map(lambda a: a[layer], params["blocks"])


def embed(params: Params, tokens: jax.Array) -> jax.Array:
  """tokens: [batch, seq] int -> [batch, seq, d_model]."""
  return params["embed"][tokens]


def logits_from_hidden(cfg: LlamaConfig, params: Params, h: jax.Array) -> jax.Array:
  """Final RMSNorm and the tied output projection. h: [batch, seq, d] -> [batch, seq, vocab]."""
  return rms_norm(h, params["final_norm"], cfg.norm_eps) @ params["embed"].T


def hidden_states(cfg: LlamaConfig, params: Params, tokens: jax.Array) -> jax.Array:
  """The last hidden states (before the final norm). tokens: [batch, seq] -> [batch, seq, d]."""
  def step(h, block):
    return block_apply(cfg, block, h), None
  h, _ = jax.lax.scan(step, embed(params, tokens), params["blocks"])
  return h


def forward(cfg: LlamaConfig, params: Params, tokens: jax.Array) -> jax.Array:
  """Logits of a dense Llama. tokens: [batch, seq] int -> [batch, seq, vocab] float32."""
  return logits_from_hidden(cfg, params, hidden_states(cfg, params, tokens))


def token_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Next-token negative log-likelihoods.

  Args:
    logits: [batch, seq, vocab] for positions 0..seq-1.
    tokens: [batch, seq] the same windows.

  Returns:
    [batch, seq - 1]: -log p(tokens[:, t + 1] | tokens[:, :t + 1]).
  """
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def hidden_nll(cfg: LlamaConfig, params: Params, h: jax.Array, tokens: jax.Array, *,
               chunk_tokens: int = 512) -> jax.Array:
  """Next-token NLLs from the last hidden state, as `token_nll` of its logits.

  The output projection runs over chunks of `chunk_tokens` positions in a sequential map,
  each chunk's NLL being logsumexp(logits) - the target's logit, so the [tokens, vocab]
  logits never exist at once (805 MB for 8 x 512 tokens of SmolLM2's 49k vocabulary;
  chunked, the projection + NLL took 0.80x the time on a 2-core CPU).

  Args:
    cfg, params: the model.
    h: [batch, seq, d_model] last hidden states.
    tokens: [batch, seq] the windows.
    chunk_tokens: positions per chunk.

  Returns:
    [batch, seq - 1].
  """
  batch, seq, d = h.shape
  x = rms_norm(h[:, :-1], params["final_norm"], cfg.norm_eps).reshape(-1, d)
  targets = tokens[:, 1:].reshape(-1)
  n = x.shape[0]
  chunk = min(chunk_tokens, n)
  pad = -n % chunk
  x = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, d)
  targets = jnp.pad(targets, (0, pad)).reshape(-1, chunk)

  def chunk_nll(args):
    x, target = args
    logits = (x @ params["embed"].T).astype(jnp.float32)
    return (jax.nn.logsumexp(logits, axis=-1)
            - jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0])

  return jax.lax.map(chunk_nll, (x, targets)).reshape(-1)[:n].reshape(batch, seq - 1)


# Module-level jits (the config is static and hashable): repeated calls reuse the compiled
# programs instead of tracing a fresh closure each time.
@functools.partial(jax.jit, static_argnums=0)
def _nll_sum(cfg: LlamaConfig, params: Params, tokens: jax.Array) -> jax.Array:
  return jnp.sum(hidden_nll(cfg, params, hidden_states(cfg, params, tokens), tokens))


@functools.partial(jax.jit, static_argnums=0)
def _last_logits(cfg: LlamaConfig, params: Params, tokens: jax.Array) -> jax.Array:
  return forward(cfg, params, tokens)[0, -1]


def perplexity(cfg: LlamaConfig, params: Params, windows: jax.Array,
               batch_size: int = 8) -> float:
  """exp(mean next-token NLL) over windows, each scored independently with a causal mask.

  Args:
    cfg: model config.
    params: model params.
    windows: [n_windows, seq] int tokens (non-overlapping windows of held-out text).
    batch_size: windows per jitted forward.

  Returns:
    The perplexity (float).
  """
  if windows.ndim != 2 or windows.shape[1] < 2:
    raise ValueError(f"windows must be [n_windows, seq>=2], got shape {windows.shape}")
  total = 0.0
  for start in range(0, windows.shape[0], batch_size):
    total += float(_nll_sum(cfg, params, jnp.asarray(windows[start:start + batch_size])))
  return float(jnp.exp(total / (windows.shape[0] * (windows.shape[1] - 1))))


def greedy_decode(cfg: LlamaConfig, params: Params, prompt: jax.Array,
                  num_tokens: int) -> jax.Array:
  """Greedy continuation without a KV cache: recomputes the prefix per token (fine for a few
  tokens; tested on a real prompt). The base of generation from a saved, compressed model.

  Args:
    cfg: model config.
    params: model params.
    prompt: [seq] int tokens.
    num_tokens: number of tokens to generate.

  Returns:
    [num_tokens] int tokens.
  """
  tokens = jnp.asarray(prompt)[None]
  out = []
  for _ in range(num_tokens):
    nxt = jnp.argmax(_last_logits(cfg, params, tokens)).astype(tokens.dtype)
    out.append(nxt)
    tokens = jnp.concatenate([tokens, nxt[None, None]], axis=1)
  return jnp.stack(out)
