"""Sequential block-by-block FFN compression of a Llama model, and the held-out perplexity.

One pipeline serves every method of paper 2 (../shared/docs/papers.md, section 2):
`dense`, `magnitude`, `wanda`, `sparsegpt` and `sparse_expansion` (K experts per FFN
linear, copy k pruned by SparseGPT on the Hessian of input cluster k, hard nearest-centroid
routing in PCA space; gate_proj and up_proj share one router fitted on their common input,
down_proj has its own on the intermediate activation). Only the FFN linears are
compressed; attention stays dense. Every compressed linear is an `fpe_jax.experts.ExpertBank`
(one expert and no router for the single-model methods), so one apply serves them all.

Sequential calibration, as in the authors' code: block i is calibrated on the outputs of
blocks 0..i-1 as already compressed, then the calibration hidden states are pushed through
the compressed block. Within a block, down_proj is calibrated on the DENSE gate/up
intermediate when `dense_within_block` (the authors' code), else on the intermediate of the
compressed gate/up. The held-out windows are pushed through each block as soon as it is
compressed, so memory holds one block's activations (calibration + evaluation), never every
layer's, and no compressed weights outlive their block. After each compressed block the
pipeline's state (`PipelineState`) goes to an `on_block` callback and can come back as
`resume=`, so a binary that checkpoints it resumes a killed run after its last block;
with a `mesh`, each block's calibration runs split over its `data` and `expert` axes.

Everything here is pure (no I/O); the binaries in experiments/ add flags, files and plots.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fpe_jax import experts, sparse
from fpe_jax.metrics import wasserstein_to_gaussian
from fpe_jax.models import llama
from kernels_pallas import implementations

METHODS = ("dense", "magnitude", "wanda", "sparsegpt", "sparse_expansion")
NEURON_SELECTIONS = ("all", "wasserstein", "random", "mean", "variance", "weight_norm")
FFN_MATRICES = ("w_gate", "w_up", "w_down")
# k-means needs tokens in every cluster; fewer than this many calibration tokens per
# expert (on average) leaves clusters too small for a usable Hessian.
MIN_TOKENS_PER_EXPERT = 16

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class CompressionConfig:
  """How each FFN linear is compressed.

  Attributes:
    method: one of METHODS.
    sparsity: fraction of pruned weights in [0, 1) (each method's own definition, see
      fpe_jax.sparse); ignored when n_m is given.
    n_m: optional (n, m) semi-structured pattern, e.g. (2, 4).
    num_experts: K, experts per FFN linear (sparse_expansion only; K=1 is SparseGPT).
    pca_components: PCA dimension of the routers (None: d_in // 32, as the authors).
    kmeans_restarts, kmeans_iters: k-means++ restarts and Lloyd iterations.
    dense_within_block: calibrate down_proj on the dense gate/up intermediate.
    damp, block_size: SparseGPT's relative damping and column block.
    neuron_selection: prune only a `neuron_fraction` of each matrix's output neurons (its
      columns), chosen by this criterion (top scores; `random` draws them), the rest stays
      dense; `all` prunes every neuron. For the Wasserstein-neuron ablation.
    neuron_fraction: share of neurons pruned when neuron_selection is not `all`.
    expert_matmul: routed expert apply, one of kernels_pallas.implementations.IMPLEMENTATIONS:
      `xla` the grouped XLA apply (tiled on CPU, `lax.ragged_dot` elsewhere); `pallas` the
      Pallas expert matmul, with block metadata built from the experts' masks; `auto`
      `pallas` on TPU / GPU, `xla` on CPU.
    expert_batch_size: experts pruned together (vmapped) per step of
      fpe_jax.experts.prune_experts' compiled map; 1 keeps memory at one expert's.
  """
  method: str = "sparsegpt"
  sparsity: float = 0.5
  n_m: tuple[int, int] | None = None
  num_experts: int = 1
  pca_components: int | None = None
  kmeans_restarts: int = 10
  kmeans_iters: int = 50
  dense_within_block: bool = True
  damp: float = 0.01
  block_size: int = 128
  neuron_selection: str = "all"
  neuron_fraction: float = 0.03
  expert_matmul: str = "auto"
  expert_batch_size: int = 1

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method={self.method!r} must be one of {METHODS}")
    if not 0.0 <= self.sparsity < 1.0:
      raise ValueError(f"sparsity={self.sparsity} must be in [0, 1)")
    if self.n_m is not None:
      n, m = self.n_m
      if not 0 <= n < m:
        raise ValueError(f"n_m={self.n_m}: needs 0 <= n < m")
    if self.num_experts < 1:
      raise ValueError(f"num_experts={self.num_experts} must be >= 1")
    if self.num_experts > 1 and self.method != "sparse_expansion":
      raise ValueError(f"num_experts={self.num_experts} > 1 needs method='sparse_expansion'")
    if self.neuron_selection not in NEURON_SELECTIONS:
      raise ValueError(
          f"neuron_selection={self.neuron_selection!r} must be one of {NEURON_SELECTIONS}")
    if not 0.0 < self.neuron_fraction <= 1.0:
      raise ValueError(f"neuron_fraction={self.neuron_fraction} must be in (0, 1]")
    if self.neuron_selection != "all" and self.method == "sparse_expansion":
      raise ValueError("neuron_selection applies to single-model methods, not sparse_expansion")
    if self.expert_matmul not in implementations.IMPLEMENTATIONS:
      raise ValueError(f"expert_matmul={self.expert_matmul!r} must be one of "
                       f"{implementations.IMPLEMENTATIONS}")
    if not isinstance(self.expert_batch_size, int) or self.expert_batch_size < 1:
      raise ValueError(f"expert_batch_size={self.expert_batch_size!r} must be an int >= 1")


def check_calibration_mesh(mesh: Mesh | None, num_tokens: int, cfg: CompressionConfig
                           ) -> NamedSharding | None:
  """The placement of a block's calibration tokens [tokens, d] on `mesh` (split over
  `data`; None without a mesh or a `data` axis); ValueError when the mesh does not fit."""
  if mesh is None:
    return None
  if not set(mesh.axis_names) <= {"data", experts.EXPERT_AXIS}:
    raise ValueError(f"mesh: axes must be among ('data', 'expert'), got {mesh.axis_names}")
  data = mesh.shape.get("data", 1)
  if num_tokens % data:
    raise ValueError(f"mesh: {num_tokens} calibration tokens do not split over its {data} "
                     "`data` devices")
  expert = mesh.shape.get(experts.EXPERT_AXIS, 1)
  if cfg.method == "sparse_expansion" and cfg.num_experts % expert:
    raise ValueError(f"mesh: num_experts={cfg.num_experts} does not split over its {expert} "
                     "`expert` devices")
  return NamedSharding(mesh, PartitionSpec("data", None)) if "data" in mesh.axis_names else None


def check_calibration_size(num_tokens: int, num_experts: int) -> None:
  """Raises a one-line ValueError when K experts cannot be fitted on num_tokens tokens."""
  if num_experts * MIN_TOKENS_PER_EXPERT > num_tokens:
    raise ValueError(
        f"num_experts={num_experts} needs at least {MIN_TOKENS_PER_EXPERT} calibration tokens "
        f"per expert ({num_experts * MIN_TOKENS_PER_EXPERT}), got {num_tokens}")


# ----------------------------------------------------------------------------------------
# Compressed FFNs: {"w_gate" | "w_up" | "w_down": experts.ExpertBank}. Single-model methods
# give one-expert banks without routers; Sparse Expansion gives K-expert banks, w_gate and
# w_up sharing one router (fitted on their common input), w_down its own.


def _prune_single(w: jax.Array, h_state: sparse.HessianState, cfg: CompressionConfig,
                  columns: jax.Array | None) -> experts.ExpertBank:
  """One matrix [d_in, d_out] pruned by cfg.method, only `columns` (output neurons) if given.

  Returns its one-expert bank (the unselected columns dense, mask 1).
  """
  target = w if columns is None else w[:, columns]
  kw = dict(sparsity=cfg.sparsity, n_m=cfg.n_m)
  if cfg.method == "magnitude":
    pruned, mask = sparse.magnitude(target, **kw)
  elif cfg.method == "wanda":
    pruned, mask = sparse.wanda(target, sparse.input_norms(h_state), **kw)
  else:
    pruned, mask = sparse.sparsegpt(target, h_state.h, damp=cfg.damp,
                                    block_size=cfg.block_size, **kw)
  if columns is None:
    return experts.single_expert(pruned, mask)
  return experts.single_expert(w.at[:, columns].set(pruned),
                               jnp.ones_like(w).at[:, columns].set(mask))


def select_neurons(key: jax.Array, w: jax.Array, y: jax.Array, criterion: str,
                   fraction: float) -> jax.Array:
  """Indices of the top `fraction` of output neurons by a criterion.

  Args:
    key: PRNG key (used by `random` only).
    w: [d_in, d_out] weights (columns are neurons).
    y: [tokens, d_out] the neurons' pre-activation outputs on calibration tokens.
    criterion: `wasserstein` (distance of the z-scored output to N(0,1)), `mean` (|mean y|),
      `variance` (var y), `weight_norm` (||w[:, j]||), `random`.
    fraction: share of neurons, at least one.

  Returns:
    [ceil(fraction * d_out)] int32 sorted indices.
  """
  count = max(1, math.ceil(fraction * w.shape[1]))
  if criterion == "random":
    return jnp.sort(jax.random.choice(key, w.shape[1], (count,), replace=False))
  scores = {
      "wasserstein": lambda: wasserstein_to_gaussian(y),
      "mean": lambda: jnp.abs(jnp.mean(y, axis=0)),
      "variance": lambda: jnp.var(y, axis=0),
      "weight_norm": lambda: jnp.linalg.norm(w, axis=0),
  }
  if criterion not in scores:
    raise ValueError(f"criterion={criterion!r} must be one of {NEURON_SELECTIONS[1:]}")
  return jnp.sort(jax.lax.top_k(scores[criterion](), count)[1]).astype(jnp.int32)


def _hessian(x: jax.Array, chunk: int = 16384) -> sparse.HessianState:
  state = sparse.hessian_init(x.shape[-1])
  for start in range(0, x.shape[0], chunk):
    state = sparse.hessian_update(state, x[start:start + chunk])
  return state


def compress_ffn_single(key: jax.Array, block: Params, x: jax.Array,
                        cfg: CompressionConfig) -> tuple[Params, dict]:
  """Compresses one FFN with a single-model method (dense, magnitude, wanda, sparsegpt).

  Args:
    key: PRNG key (random neuron selection).
    block: the block's params (w_gate, w_up, w_down [d_in, d_out]).
    x: [tokens, d_model] the FFN input on calibration tokens.
    cfg: compression config.

  Returns:
    (ffn, info): ffn = {"w_gate"|"w_up"|"w_down": one-expert ExpertBank, w and mask [1, d_in,
    d_out], no router}; info holds the selected neuron indices per matrix when
    neuron_selection is not `all`.

  PRNG: `key` splits into 3 keys, one per matrix (gate, up, down), for random selections.
  """
  info: dict = {}
  if cfg.method == "dense":
    return {name: experts.single_expert(block[name]) for name in FFN_MATRICES}, info
  keys = dict(zip(FFN_MATRICES, jax.random.split(key, 3), strict=True))

  def columns(name, w, inputs):
    if cfg.neuron_selection == "all":
      return None
    sel = select_neurons(keys[name], w, inputs @ w, cfg.neuron_selection, cfg.neuron_fraction)
    info[name] = np.asarray(sel)
    return sel

  h_in = _hessian(x) if cfg.method != "magnitude" else None
  gate = _prune_single(block["w_gate"], h_in, cfg, columns("w_gate", block["w_gate"], x))
  up = _prune_single(block["w_up"], h_in, cfg, columns("w_up", block["w_up"], x))
  dense_inter = cfg.dense_within_block or cfg.method == "magnitude"
  inter = llama.swiglu(x @ block["w_gate"], x @ block["w_up"]) if dense_inter else (
      llama.swiglu(x @ gate.w[0], x @ up.w[0]))
  h_mid = _hessian(inter) if cfg.method != "magnitude" else None
  down = _prune_single(block["w_down"], h_mid, cfg, columns("w_down", block["w_down"], inter))
  return {"w_gate": gate, "w_up": up, "w_down": down}, info


def ffn_apply(ffn: Params, x: jax.Array, implementation: str = "auto") -> jax.Array:
  """Compressed SwiGLU FFN (no residual). x: [..., d_model] -> [..., d_model].

  Args:
    ffn: {"w_gate" | "w_up" | "w_down": experts.ExpertBank}; w_up shares w_gate's router
      (the tokens are routed once, by w_gate's).
    x: [..., d_model].
    implementation: `experts.apply_experts`' implementation for banks of K > 1 experts.

  Returns:
    [..., d_model].
  """
  shape = x.shape
  x = x.reshape(-1, shape[-1])
  gate, up, down = ffn["w_gate"], ffn["w_up"], ffn["w_down"]
  ids_in = experts.route(gate, x)
  inter = llama.swiglu(experts.apply_expert_linear(gate, x, ids_in, implementation=implementation),
                       experts.apply_expert_linear(up, x, ids_in, implementation=implementation))
  return experts.apply_expert_linear(down, inter, implementation=implementation).reshape(shape)


# ----------------------------------------------------------------------------------------
# The pipeline.


@dataclasses.dataclass
class PipelineResult:
  """What `run_pipeline` returns.

  Attributes:
    perplexity: exp(mean next-token NLL) on the evaluation windows.
    mean_nll: the mean NLL.
    layers: one dict per compressed layer, from the per-layer hook (may be empty).
    ffns: with `keep_ffns`, the compressed model: {layer: ffn} of `ffn_apply`'s banks
      (without kernel metadata, which `experts.with_block_mask` rebuilds); else None.
  """
  perplexity: float
  mean_nll: float
  layers: list[dict]
  ffns: dict[int, Params] | None = None


@dataclasses.dataclass
class PipelineState:
  """What `run_pipeline` carries from one compressed block to the next: all a resumed run
  needs to continue after its last finished block and end with the same numbers.

  Attributes:
    blocks_done: compressed blocks finished, in the order of `layers`.
    key: the PRNG key the next compressed block splits.
    h_cal: [n_calib, seq_c, d_model] calibration hidden states after the last finished
      block (None once no compressed block is left).
    h_eval: [n_eval, seq_e, d_model] held-out hidden states after it.
    records: the layer hook's dicts so far.
    ffns: with `keep_ffns`, {layer: ffn} of the blocks finished so far; else None.
  """
  blocks_done: int
  key: jax.Array
  h_cal: jax.Array | None
  h_eval: jax.Array
  records: list[dict]
  ffns: dict[int, Params] | None = None


LayerHook = Callable[[int, Params, jax.Array, Params, dict], dict]

# Module-level jits (no per-call lambdas, params as arguments, not baked-in constants): every
# run_pipeline call of a sweep reuses their compilations.
_ATTENTION = jax.jit(llama.attention_sublayer, static_argnums=0)
_FFN_INPUT = jax.jit(llama.ffn_input, static_argnums=0)
_DENSE_BLOCK = jax.jit(llama.block_apply, static_argnums=0)
_EMBED = jax.jit(llama.embed)


@functools.partial(jax.jit, static_argnames=("implementation",))
def _ffn_residual(ffn: Params, h: jax.Array, x: jax.Array, *, implementation: str) -> jax.Array:
  return h + ffn_apply(ffn, x, implementation)


@functools.partial(jax.jit, static_argnums=0)
def _nll_sum(model_cfg: llama.LlamaConfig, params: Params, h: jax.Array, tokens: jax.Array
             ) -> jax.Array:
  return jnp.sum(llama.hidden_nll(model_cfg, params, h, tokens))


def _batched(fn, arrays: Sequence[jax.Array], batch_size: int) -> jax.Array:
  """fn over leading-axis batches of the arrays, concatenated (bounded peak memory)."""
  n = arrays[0].shape[0]
  outs = [fn(*(a[s:s + batch_size] for a in arrays)) for s in range(0, n, batch_size)]
  return jnp.concatenate(outs, axis=0)


def _block_step(model_cfg: llama.LlamaConfig, block: Params, ffn: Params | None,
                h: jax.Array, *, batch_size: int, implementation: str) -> jax.Array:
  """One block over all windows of h: dense, or with its FFN replaced by `ffn`. The one
  evaluation step of `run_pipeline` and `compressed_hidden`, so a saved model reloaded
  gives the run's numbers exactly."""
  if ffn is None:
    return _batched(lambda h: _DENSE_BLOCK(model_cfg, block, h), [h], batch_size)
  a = _batched(lambda h: _ATTENTION(model_cfg, block, h), [h], batch_size)
  x = _batched(lambda a: _FFN_INPUT(model_cfg, block, a), [a], batch_size)
  return _batched(lambda a, x: _ffn_residual(ffn, a, x, implementation=implementation),
                  [a, x], batch_size)


def _mean_nll(model_cfg: llama.LlamaConfig, params: Params, h: jax.Array,
              windows: jax.Array, batch_size: int) -> float:
  """Mean next-token NLL of the windows from their last hidden states h."""
  total = sum(float(_nll_sum(model_cfg, params, h[s:s + batch_size], windows[s:s + batch_size]))
              for s in range(0, windows.shape[0], batch_size))
  return total / (windows.shape[0] * (windows.shape[1] - 1))


def strip_kernel_metadata(ffn: Params) -> Params:
  """The FFN's banks without their host-built kernel metadata (what a saved model holds)."""
  return {name: bank._replace(block_mask=None) for name, bank in ffn.items()}


def compressed_hidden(model_cfg: llama.LlamaConfig, params: Params,
                      ffns: Mapping[int, Params], windows: jax.Array, *, batch_size: int = 8,
                      implementation: str = "auto") -> jax.Array:
  """Last hidden states of the model whose block `l` FFN is `ffns[l]` (dense elsewhere).

  Args:
    model_cfg, params: the base model.
    ffns: {layer: ffn} as `PipelineResult.ffns` (kernel metadata attached where
      `implementation` is "pallas").
    windows: [n, seq] int tokens.
    batch_size: windows per jitted block call (the run's, to reproduce its numbers).
    implementation: the expert apply's implementation.

  Returns:
    [n, seq, d_model].
  """
  h = _batched(lambda t: _EMBED(params, t), [jnp.asarray(windows)], batch_size)
  for layer in range(model_cfg.n_layers):
    h = _block_step(model_cfg, llama.block_params(params, layer), ffns.get(layer), h,
                    batch_size=batch_size, implementation=implementation)
  return h


def compressed_perplexity(model_cfg: llama.LlamaConfig, params: Params,
                          ffns: Mapping[int, Params], windows: jax.Array, *,
                          batch_size: int = 8, implementation: str = "auto"
                          ) -> tuple[float, float]:
  """(perplexity, mean NLL) of the compressed model on held-out windows, computed as
  `run_pipeline` computes its own (same steps, same batches)."""
  windows = jnp.asarray(windows)
  h = compressed_hidden(model_cfg, params, ffns, windows, batch_size=batch_size,
                        implementation=implementation)
  mean_nll = _mean_nll(model_cfg, params, h, windows, batch_size)
  return float(np.exp(mean_nll)), mean_nll


def compressed_greedy(model_cfg: llama.LlamaConfig, params: Params,
                      ffns: Mapping[int, Params], prompt: Sequence[int], num_tokens: int, *,
                      implementation: str = "auto") -> list[int]:
  """Greedy continuation of `prompt` by the compressed model, without a KV cache.

  The window is padded to its final length once, so every step reuses one compilation:
  attention is causal, so the padding after position t never changes position t's logits.
  """
  length = len(prompt) + num_tokens
  tokens = np.zeros((1, length), np.int32)
  tokens[0, :len(prompt)] = prompt
  for t in range(len(prompt), length):
    h = compressed_hidden(model_cfg, params, ffns, tokens, batch_size=1,
                          implementation=implementation)
    tokens[0, t] = int(jnp.argmax(llama.logits_from_hidden(model_cfg, params, h[:, t - 1])))
  return tokens[0, len(prompt):].tolist()


def run_pipeline(key: jax.Array, model_cfg: llama.LlamaConfig, params: Params,
                 calib_windows: jax.Array, eval_windows: jax.Array, cfg: CompressionConfig,
                 *, layers: Sequence[int] | None = None, batch_size: int = 8,
                 layer_hook: LayerHook | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 keep_ffns: bool = False, resume: PipelineState | None = None,
                 on_block: Callable[[PipelineState], None] | None = None,
                 mesh: Mesh | None = None) -> PipelineResult:
  """Compresses the FFNs of `layers` block by block and returns the held-out perplexity.

  Args:
    key: PRNG key (k-means seeding, random neuron selection). Stream: for each compressed
      layer in order, `key, layer_key = jax.random.split(key)`, and layer_key goes to
      `compress_ffn_single` / `compress_ffn_experts` (see theirs).
    model_cfg: model config.
    params: dense model params (stacked blocks).
    calib_windows: [n_calib, seq_c] int calibration tokens.
    eval_windows: [n_eval, seq_e] int held-out tokens.
    cfg: compression config.
    layers: blocks whose FFN is compressed (default all); the others stay dense.
    batch_size: windows per jitted block call.
    layer_hook: optional (layer, block, x, ffn, info) -> dict, called after each compressed
      layer with its calibration FFN input x [tokens, d]; its dicts make `layers`.
    progress: optional (layers_done, total) callback.
    keep_ffns: return the compressed FFNs (the model, for saving) in the result.
    resume: a state `on_block` was given by an earlier call with the same arguments: the
      pipeline continues after its last finished block, to the same result.
    on_block: optional callback with the state after each compressed block (a binary
      checkpoints it, so a killed run resumes there).
    mesh: optional mesh with axes `data` and / or `expert` for the calibration: each
      block's calibration tokens are split over `data` (their Hessians, PCA and k-means
      are then sums XLA all-reduces: the same numbers up to float order), and the K
      expert prunes of Sparse Expansion over `expert` (its size must divide K).

  Returns:
    PipelineResult.
  """
  n_layers = model_cfg.n_layers
  layers = sorted(set(range(n_layers) if layers is None else layers))
  if layers and not 0 <= layers[0] <= layers[-1] < n_layers:
    raise ValueError(f"layers={layers} must be in [0, {n_layers})")
  if cfg.method == "dense":
    layers = []
  calib_tokens = int(np.prod(calib_windows.shape))
  check_calibration_size(calib_tokens, cfg.num_experts)
  token_split = check_calibration_mesh(mesh, calib_tokens, cfg)
  compress_fn = functools.partial(compress_ffn_experts, mesh=mesh) if (
      cfg.method == "sparse_expansion") else compress_ffn_single

  ffn_residual = functools.partial(_ffn_residual, implementation=cfg.expert_matmul)
  step_kw = dict(batch_size=batch_size, implementation=cfg.expert_matmul)
  if resume is None:
    embed = lambda t: _EMBED(params, t)  # noqa: E731
    resume = PipelineState(
        0, key, _batched(embed, [jnp.asarray(calib_windows)], batch_size) if layers else None,
        _batched(embed, [jnp.asarray(eval_windows)], batch_size), [],
        {} if keep_ffns else None)
  elif not 0 <= resume.blocks_done <= len(layers) or (resume.ffns is None) == keep_ffns:
    raise ValueError(f"resume: a state of {resume.blocks_done} blocks done (ffns kept: "
                     f"{resume.ffns is not None}) does not fit layers={layers} with "
                     f"keep_ffns={keep_ffns}")
  key, h_cal, h_eval = resume.key, resume.h_cal, resume.h_eval
  records = list(resume.records)
  kept = None if resume.ffns is None else dict(resume.ffns)
  first = layers[resume.blocks_done - 1] + 1 if resume.blocks_done else 0
  last = layers[-1] if layers else -1
  for layer in range(first, n_layers):
    block = llama.block_params(params, layer)
    if layer not in layers:
      h_eval = _block_step(model_cfg, block, None, h_eval, **step_kw)
      if h_cal is not None and layer < last:
        h_cal = _block_step(model_cfg, block, None, h_cal, **step_kw)
      elif layer >= last:
        h_cal = None
      continue
    key, layer_key = jax.random.split(key)
    attn = lambda h, b=block: _ATTENTION(model_cfg, b, h)  # noqa: E731
    norm = lambda h, b=block: _FFN_INPUT(model_cfg, b, h)  # noqa: E731
    a_cal = _batched(attn, [h_cal], batch_size)
    x_cal = _batched(norm, [a_cal], batch_size)
    tokens = x_cal.reshape(-1, model_cfg.d_model)
    if token_split is not None:
      tokens = jax.device_put(tokens, token_split)
    ffn, info = compress_fn(layer_key, block, tokens, cfg)
    if layer_hook is not None:
      records.append(layer_hook(layer, block, tokens, ffn, info))
    del tokens
    step = lambda h, x, f=ffn: ffn_residual(f, h, x)  # noqa: E731
    h_cal = _batched(step, [a_cal, x_cal], batch_size) if layer < last else None
    del a_cal, x_cal
    h_eval = _block_step(model_cfg, block, ffn, h_eval, **step_kw)
    if kept is not None:
      kept[layer] = strip_kernel_metadata(ffn)
    del ffn
    done = layers.index(layer) + 1
    if on_block is not None:
      on_block(PipelineState(done, key, h_cal, h_eval, list(records),
                             None if kept is None else dict(kept)))
    if progress is not None:
      progress(done, len(layers))
  mean_nll = _mean_nll(model_cfg, params, h_eval, jnp.asarray(eval_windows), batch_size)
  return PipelineResult(float(np.exp(mean_nll)), mean_nll, records, kept)


def compress_ffn_experts(key: jax.Array, block: Params, x: jax.Array,
                         cfg: CompressionConfig, *, mesh: Mesh | None = None
                         ) -> tuple[Params, dict]:
  """Sparse Expansion of one FFN: routers and K SparseGPT experts per linear.

  Args:
    key: PRNG key (k-means seeding).
    block: the block's params.
    x: [tokens, d_model] the FFN input on calibration tokens.
    cfg: compression config (method sparse_expansion).
    mesh: optional mesh whose `expert` axis spreads the K expert prunes
      (`experts.prune_experts`).

  Returns:
    (ffn, info): ffn = {"w_gate"|"w_up"|"w_down": experts.ExpertBank with w, mask [K, d_in,
    d_out] (and the host-built block_mask where expert_matmul resolves to `pallas`)}, w_gate
    and w_up sharing the router fitted on x, w_down with the router fitted on the
    intermediate;
    info = {"ids_in", "ids_mid": [tokens] expert ids,
    "inter": [tokens, d_ff] the intermediate the down router was fitted on}.

  PRNG: `key` splits into (key_in, key_mid): the k-means seeding of the gate/up router and
  of the down router.
  """
  k = cfg.num_experts
  key_in, key_mid = jax.random.split(key)
  router_kw = dict(n_components=cfg.pca_components, n_restarts=cfg.kmeans_restarts,
                   max_iters=cfg.kmeans_iters)
  prune_kw = dict(sparsity=cfg.sparsity, n_m=cfg.n_m, damp=cfg.damp, block_size=cfg.block_size,
                  expert_batch_size=cfg.expert_batch_size, mesh=mesh)
  # Kernel metadata only where the kernel will run ("pallas", or "auto" on TPU / GPU), and
  # before any apply: the compressed intermediate below runs gate and up through it.
  pallas = implementations.resolve_implementation(cfg.expert_matmul) == "pallas"

  def attach(bank: experts.ExpertBank) -> experts.ExpertBank:
    return experts.with_block_mask(bank) if pallas else bank

  gate, ids_in = experts.expand_linear(key_in, block["w_gate"], x, k, **router_kw, **prune_kw)
  gate = attach(gate)
  up = attach(experts.build_experts(block["w_up"], x, ids_in, k, router=gate.router,
                                    **prune_kw))
  if cfg.dense_within_block:
    inter = llama.swiglu(x @ block["w_gate"], x @ block["w_up"])
  else:
    inter = llama.swiglu(
        experts.apply_expert_linear(gate, x, ids_in, implementation=cfg.expert_matmul),
        experts.apply_expert_linear(up, x, ids_in, implementation=cfg.expert_matmul))
  down, ids_mid = experts.expand_linear(key_mid, block["w_down"], inter, k, **router_kw,
                                        **prune_kw)
  ffn = {"w_gate": gate, "w_up": up, "w_down": attach(down)}
  return ffn, {"ids_in": ids_in, "ids_mid": ids_mid, "inter": inter}
