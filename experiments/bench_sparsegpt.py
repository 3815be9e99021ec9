"""SparseGPT speed: fpe_jax.sparse against a naive column-by-column version, same process.

  python -m experiments.bench_sparsegpt
  python -m experiments.bench_sparsegpt --sparsity=0.7 --n_m= --repeats=5 --shapes=576x1536

Both versions run jitted in the same process on the same weights and Hessian, for the
SmolLM2 FFN shapes w[576, 1536] (gate/up) and w[1536, 576] (down), with --sparsity
unstructured and with the --n_m pattern (e.g. 2:4). The naive version is the paper's
algorithm without batching, written plainly: its factor U by inverting H and factoring the
inverse, then every input's error updates ALL later inputs of W at once (a rank-one update
of the whole matrix per input). fpe_jax.sparse factors h once, in blocks, gathers the
earlier blocks' updates per block of --block_size inputs in matmuls, and inside a block runs
its inputs in sub-blocks (`fpe_jax.sparse._sparsegpt`). Both choose their masks by the same rule
(per block, or per n:m group, from the updated weights), so the outputs agree up to float32
rounding: the two factors of H^-1 are computed differently, which can swap near-tied scores
(more often for the ill-conditioned 1536 x 1536 H) and the updates after them. The fraction
of mask entries that agree and ||w - w_naive|| / ||w_naive|| are printed. Times are the
median of --repeats calls after a first call; ratio = naive / fpe_jax; first_s is fpe_jax's
first call (compilation included) for that shape and pattern. Weights and inputs are
random (speed does not depend on their values): inputs are correlated activation-like
features, --tokens of them.

With --torch_python and --official_sparsegpt it also times the official IST-DASLab torch
SparseGPT (`fasterprune`, run by experiments.peer_baselines in that virtualenv, as many
threads as this machine has cores) on the same w, Hessian and pattern, and prints its median,
its time over ours and its layer error over ours (on the random inputs).

With --recon_layers (e.g. 3,15,29), it also prints the layer reconstruction error of each
method on REAL activations of SmolLM2-135M (needs `bash scripts/install_data.sh`): the dense
model runs --recon_windows random Austen calibration windows (seed --seed) up to each chosen
block; gate_proj [576, 1536] is pruned with the Hessian of its input and down_proj
[1536, 576] with that of the dense intermediate, and the relative error
||XW - XW'||^2 / ||XW||^2 is printed on those calibration tokens and on as many held-out
tokens (the evaluation novel).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import statistics
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import common, llm_setup, peer_baselines
from fpe_jax import sparse

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["576x1536", "1536x576"], "Weight shapes d_inxd_out.")
flags.DEFINE_float("sparsity", 0.5, "Unstructured sparsity in [0, 1).")
flags.DEFINE_string("n_m", "2:4", "n:m pattern timed too, as n:m ('' for none).")
flags.DEFINE_integer("block_size", 128, "SparseGPT column block.")
flags.DEFINE_integer("tokens", 4096, "Calibration tokens behind the Hessian.")
flags.DEFINE_integer("repeats", 3, "Timed calls; the median is reported.")
flags.DEFINE_integer("seed", 0, "Seed of the random weights, inputs and windows.")
flags.DEFINE_list("recon_layers", [], "SmolLM2 blocks for the error table.")
flags.DEFINE_integer("recon_windows", 8, "Calibration windows (error table).")
flags.DEFINE_integer("recon_window", 256, "Tokens per window (error table).")
flags.DEFINE_string("torch_python", "", "Python of a torch virtualenv: also time the official "
                    "SparseGPT (experiments.peer_baselines) on the same weights and Hessians.")
flags.DEFINE_string("official_sparsegpt", "", "Checkout of the official IST-DASLab/sparsegpt "
                    "code (its sparsegpt.py), for --torch_python.")
common.seed_validator("seed")
common.flag_validator("torch_python", peer_baselines.is_python,
                      "must be the python executable of a torch virtualenv (or empty)")
common.flag_validator("official_sparsegpt", lambda v: not v or os.path.isfile(
    os.path.join(v, "sparsegpt.py")), "must be a folder holding the official sparsegpt.py")
flags.register_multi_flags_validator(
    ["torch_python", "official_sparsegpt"], lambda f: bool(f["torch_python"])
    == bool(f["official_sparsegpt"]), "--torch_python and --official_sparsegpt go together")


def parse_shape(text: str) -> tuple[int, int] | None:
  """(d_in, d_out) of a --shapes entry such as 576x1536; None unless two integers >= 1."""
  try:
    d_in, d_out = (int(v) for v in text.lower().split("x"))
  except ValueError:
    return None
  return (d_in, d_out) if min(d_in, d_out) >= 1 else None


common.flag_validator("shapes", lambda v: bool(v) and all(parse_shape(s) for s in v),
                      "entries must look like 576x1536 (d_in x d_out, both >= 1)")
common.flag_validator("sparsity", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")


def parse_n_m(text: str) -> tuple[int, int] | None:
  """(n, m) of an --n_m value such as 2:4; None unless two integers with 0 <= n < m."""
  try:
    n, m = (int(v) for v in text.split(":"))
  except ValueError:
    return None
  return (n, m) if 0 <= n < m else None


common.flag_validator("n_m", lambda v: v == "" or parse_n_m(v) is not None,
                      "must be n:m with 0 <= n < m (e.g. 2:4), or empty")
for _name in ("block_size", "tokens", "repeats", "recon_windows", "recon_window"):
  common.flag_validator(_name, lambda v: v >= 1, "must be >= 1")
common.flag_validator("recon_layers", lambda v: (x := common.int_list(v)) is not None
                      and all(layer >= 0 for layer in x), "must be block indices >= 0")


@dataclasses.dataclass(frozen=True)
class Config:
  """The benchmark's flags, read once (`config_from_flags`).

  Attributes:
    shapes: the (d_in, d_out) weight shapes timed.
    sparsity: unstructured sparsity in [0, 1).
    n_m: the n:m pattern also timed, or None.
    block_size: SparseGPT column block.
    tokens: calibration tokens behind each random Hessian.
    repeats: timed calls (the median is reported).
    seed: the seed of the random weights, inputs and calibration windows.
    recon_layers: SmolLM2 blocks of the reconstruction-error table (empty: no table).
    recon_windows: calibration (and held-out) windows of the table.
    recon_window: tokens per window of the table.
    torch_python, official_sparsegpt: the torch virtualenv's python and the official
      code's checkout, to time it on the same inputs ('' : not).
  """
  shapes: tuple[tuple[int, int], ...]
  sparsity: float
  n_m: tuple[int, int] | None
  block_size: int
  tokens: int
  repeats: int
  seed: int
  recon_layers: tuple[int, ...]
  recon_windows: int
  recon_window: int
  torch_python: str = ""
  official_sparsegpt: str = ""


def config_from_flags() -> Config:
  """The config of the parsed flags (the layers' range needs the model and is checked when it
  is loaded)."""
  n_m = parse_n_m(FLAGS.n_m) if FLAGS.n_m else None
  if n_m is not None:
    for d_in, _ in (parse_shape(s) for s in FLAGS.shapes):
      width = min(FLAGS.block_size, d_in)
      common.validate("n_m", d_in % n_m[1] == 0 and width % n_m[1] == 0,
                      f"m={n_m[1]} must divide every d_in and the block width, got d_in={d_in}")
  return Config(shapes=tuple(parse_shape(s) for s in FLAGS.shapes), sparsity=FLAGS.sparsity,
                n_m=n_m, block_size=FLAGS.block_size, tokens=FLAGS.tokens, repeats=FLAGS.repeats,
                seed=FLAGS.seed, recon_layers=tuple(common.int_list(FLAGS.recon_layers)),
                recon_windows=FLAGS.recon_windows, recon_window=FLAGS.recon_window,
                torch_python=FLAGS.torch_python, official_sparsegpt=FLAGS.official_sparsegpt)


def _keep_lowest(scores, num_prune, axis=None):
  """0/1 mask pruning the num_prune lowest scores (of all, or along axis; ties by position)."""
  flat = scores.reshape(-1) if axis is None else scores
  ranks = jnp.argsort(jnp.argsort(flat, axis=-1, stable=True), axis=-1, stable=True)
  return (ranks >= num_prune).astype(jnp.float32).reshape(scores.shape)


@functools.partial(jax.jit, static_argnames=("n_m", "block_size"))
def naive_sparsegpt(w, h, num_prune, *, n_m, block_size):
  """SparseGPT without lazy batching: each input's error updates all of W at once.

  The paper's layout W = w.T [d_out, d_in] and factor (H^-1 = U^T U, U upper: Cholesky of
  the inverse), fpe_jax.sparse.sparsegpt's dead inputs, damping 0.01 (no retries) and mask
  choice (per block of num_prune [2] for the full and the last block; or per n:m group when
  the loop reaches it); returns the pruned [d_in, d_out] weights.
  """
  d_in, d_out = w.shape
  dead = jnp.diagonal(h) == 0
  h = h + jnp.diag(dead.astype(h.dtype))
  h = h + 0.01 * jnp.mean(jnp.diagonal(h)) * jnp.eye(d_in)
  upper = jnp.linalg.cholesky(jnp.linalg.inv(h)).T
  diag = jnp.diagonal(upper)
  weights = jnp.where(dead[None, :], 0.0, w.T)
  mask = jnp.ones_like(weights)
  width = min(block_size, d_in)
  for i1 in range(0, d_in, width):  # static: one mask per block
    i2 = min(i1 + width, d_in)
    if n_m is None:
      scores = (weights[:, i1:i2] / diag[None, i1:i2]) ** 2
      mask = mask.at[:, i1:i2].set(_keep_lowest(scores, num_prune[0 if i2 - i1 == width else 1]))

    def column(i, carry):
      weights, mask = carry
      if n_m is not None:
        n, m = n_m
        group = jax.lax.dynamic_slice_in_dim(weights / diag[None, :], i, m, axis=1) ** 2
        chosen = jax.lax.dynamic_update_slice_in_dim(mask, _keep_lowest(group, n, -1), i, 1)
        mask = jnp.where(i % m == 0, chosen, mask)
      err = weights[:, i] * (1.0 - mask[:, i]) / upper[i, i]
      return weights - err[:, None] * upper[i][None, :], mask

    weights, mask = jax.lax.fori_loop(i1, i2, column, (weights, mask))
  return jnp.where(dead[None, :], 0.0, weights * mask).T



def _problem(d_in, d_out, rng, config: Config):
  """Random weights [d_in, d_out], --tokens activation-like inputs and their Hessian."""
  mix = rng.normal(size=(d_in, d_in)) / np.sqrt(d_in)
  x = rng.normal(size=(config.tokens, d_in)) @ mix * rng.lognormal(0, 0.7, d_in)
  w = jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32)
  x = jnp.asarray(x, jnp.float32)
  return w, x, sparse.hessian_from_inputs(x)


def _bench(w, h, x, pattern, config: Config):
  """(fpe_jax s, naive s, fpe_jax first call s, mask agreement, relative difference, the
  official code's timings and error ratio or None) for one shape and pattern (None:
  unstructured); x are the inputs behind h."""
  d_in, d_out = w.shape
  width = min(config.block_size, d_in)
  num_prune = jnp.asarray([
      math.floor(config.sparsity * d_out * width),
      math.floor(config.sparsity * d_out * (d_in % width)),
  ], jnp.int32)
  kw = dict(sparsity=config.sparsity) if pattern is None else dict(n_m=pattern)

  def ours():
    return sparse.sparsegpt(w, h, block_size=config.block_size, **kw)[0]

  def naive():
    return naive_sparsegpt(w, h, num_prune, n_m=pattern, block_size=config.block_size)

  first, times_ours, _ = common.time_calls(ours, config.repeats)
  t_ours = statistics.median(times_ours)
  t_naive = statistics.median(common.time_calls(naive, config.repeats)[1])
  w_ours, w_naive = ours(), naive()
  agree = float(jnp.mean((w_ours != 0) == (w_naive != 0)))
  rel = float(jnp.linalg.norm(w_ours - w_naive) / jnp.linalg.norm(w_naive))
  official = None
  if config.torch_python:
    official = _official(w, h, pattern, config)
    official["error_ratio"] = (_relative_error(x, w, official.pop("w"))
                               / _relative_error(x, w, w_ours))
  return t_ours, t_naive, first, agree, rel, official


def _official(w, h, pattern, config: Config) -> dict:
  """The official SparseGPT's median seconds (and its pruned w) on the same w, h, pattern."""
  prunen, prunem = pattern or (0, 0)
  with tempfile.TemporaryDirectory() as tmp:
    inputs, out = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
    np.savez(inputs, w=np.asarray(w), h=np.asarray(h), sparsity=config.sparsity,
             prunen=prunen, prunem=prunem, blocksize=config.block_size, percdamp=0.01)
    peer = peer_baselines.run(config.torch_python, "sparsegpt",
                              official_dir=config.official_sparsegpt, inputs=inputs, out=out,
                              repeats=config.repeats, threads=os.cpu_count() or 1)
    with np.load(out) as f:
      peer["w"] = jnp.asarray(f["w"])
  return peer


def _relative_error(x, w, w_pruned):
  y = x @ w
  return float(jnp.sum((y - x @ w_pruned) ** 2) / jnp.sum(y**2))


def _recon_inputs(config: Config):
  """(model, calibration windows, held-out windows) of the error table, checked against
  the flags before any timing runs."""
  # Imported here: only this option needs the model and the text.
  from fpe_jax.data import austen, gguf_loader

  layers = list(config.recon_layers)
  with common.packaged_data():
    ckpt = gguf_loader.load_llama_gguf()
  if not all(0 <= layer < ckpt.config.n_layers for layer in layers):
    raise common.UsageError(
        f"--recon_layers: must be in [0, {ckpt.config.n_layers}), got {layers}")
  llm_setup.check_context(ckpt, recon_window=config.recon_window)
  # A window longer than the text is the flag's; the text missing is the data's.
  with common.packaged_data(), common.blame("recon_window", ValueError):
    calib, held_out = austen.calibration_and_eval_windows(
        lambda text: ckpt.tokenizer.encode(text).ids, calib_windows=config.recon_windows,
        calib_window=config.recon_window, eval_window=config.recon_window,
        eval_windows=config.recon_windows, seed=config.seed)
  return ckpt, calib, held_out


def _recon_table(config: Config, ckpt, calib, held_out):
  """Prints the per-method reconstruction errors on real SmolLM2 activations."""
  from fpe_jax.models import llama  # noqa: PLC0415 (this option only)

  layers = list(config.recon_layers)
  cfg, params = ckpt.config, jax.tree.map(jnp.asarray, ckpt.params)
  configs = [("50%", dict(sparsity=0.5)), ("70%", dict(sparsity=0.7)), ("2:4", dict(n_m=(2, 4)))]
  print(f"relative layer error ||XW - XW'||^2 / ||XW||^2, {calib.size} calibration tokens "
        f"(calib) and {held_out.size} held-out tokens (eval)")
  print(f"{'layer':>5} {'matrix':>6} {'pattern':>7} {'method':>10} {'calib':>9} {'eval':>9}")
  block_fn = jax.jit(lambda block, h: llama.block_apply(cfg, block, h))
  attn_fn = jax.jit(lambda block, h: llama.attention_sublayer(cfg, block, h))
  h_cal, h_eval = llama.embed(params, calib), llama.embed(params, held_out)
  done = 0
  for layer in sorted(layers):
    for i in range(done, layer):
      block = llama.block_params(params, i)
      h_cal, h_eval = block_fn(block, h_cal), block_fn(block, h_eval)
    done = layer
    block = llama.block_params(params, layer)
    x_cal, x_eval = (
        llama.ffn_input(cfg, block, attn_fn(block, h)).reshape(-1, cfg.d_model)
        for h in (h_cal, h_eval))
    inter = lambda x, b=block: llama.swiglu(x @ b["w_gate"], x @ b["w_up"])  # noqa: E731
    for name, w, xc, xe in (("gate", block["w_gate"], x_cal, x_eval),
                            ("down", block["w_down"], inter(x_cal), inter(x_eval))):
      state = sparse.hessian_update(sparse.hessian_init(w.shape[0]), xc)
      for pattern, kw in configs:
        pruned = {
            "magnitude": sparse.magnitude(w, **kw)[0],
            "wanda": sparse.wanda(w, sparse.input_norms(state), **kw)[0],
            "sparsegpt": sparse.sparsegpt(w, state.h, **kw)[0],
        }
        for method, wp in pruned.items():
          print(f"{layer:5d} {name:>6} {pattern:>7} {method:>10} "
                f"{_relative_error(xc, w, wp):9.4f} {_relative_error(xe, w, wp):9.4f}")


def main(argv):
  if len(argv) > 1:
    raise common.UsageError(f"unexpected arguments {argv[1:]}; use --flags")
  config = config_from_flags()
  recon = _recon_inputs(config) if config.recon_layers else None
  rng = np.random.default_rng(config.seed)
  print(f"backend={jax.default_backend()} block_size={config.block_size} "
        f"tokens={config.tokens} repeats={config.repeats}")
  patterns = [None] + ([config.n_m] if config.n_m else [])
  print(f"{'shape':>10} {'pattern':>7} {'fpe_jax_s':>9} {'naive_s':>8} {'ratio':>6} "
        f"{'first_s':>7} {'mask_agree':>10} {'rel_diff':>9}"
        + ("  official_s official/ours error_official/ours" if config.torch_python else ""))
  for d_in, d_out in config.shapes:
    w, x, h = _problem(d_in, d_out, rng, config)
    for pattern in patterns:
      name = f"{config.sparsity:.0%}" if pattern is None else f"{pattern[0]}:{pattern[1]}"
      t_ours, t_naive, first, agree, rel, official = _bench(w, h, x, pattern, config)
      shape = f"{d_in}x{d_out}"
      line = (f"{shape:>10} {name:>7} {t_ours:9.3f} {t_naive:8.3f} {t_naive / t_ours:6.2f} "
              f"{first:7.2f} {agree:10.6f} {rel:9.2e}")
      if official:
        line += (f"  {official['median_s']:10.3f} {official['median_s'] / t_ours:13.2f} "
                 f"{official['error_ratio']:19.4f}")
      print(line)
  if config.torch_python:
    print(f"official: IST-DASLab SparseGPT fasterprune, torch {official['torch_version']}, "
          f"{official['threads']} threads; its unstructured masks prune floor(s * n) + 1 "
          "weights per block (its sort threshold is inclusive), ours floor(s * n)")
  if recon is not None:
    _recon_table(config, *recon)


if __name__ == "__main__":
  common.run(main)
