"""Wasserstein neurons on SmolLM2-135M: the targeted-sparsification ablation and the
expert-weighted Wasserstein distance (WD) before and after Sparse Expansion.

  python -m experiments.wasserstein --flagfile=experiments/flags/wasserstein_quick.flags

Ablation: in every compressed FFN matrix (gate, up, down), only --neuron_fraction of the
output neurons are pruned (by --method at --sparsity; the rest stays dense), chosen as the
top by WD to N(0, 1) of their z-scored pre-activations on the calibration tokens, or at
random, or by |mean|, variance or weight norm; held-out Austen perplexity for each.
Expansion: a Sparse Expansion run with --num_experts experts at --expansion_sparsity; per
layer and matrix, the mean WD of the dense neurons on all tokens and the expert-weighted WD
sum_k (n_k / n) WD(outputs of expert k on cluster k) (fpe_jax.experts.
expert_weighted_wasserstein, of the experts and of the dense weights on the same clusters),
over all neurons and over the Wasserstein neurons (top --neuron_fraction by dense WD).

The flags are read once, by `config_from_flags`; results.json holds that config. PRNG
streams: the calibration windows are drawn by `numpy.random.default_rng(--seed)`
(fpe_jax.data.austen.random_windows); every run's pipeline starts from the same key
`jax.random.key(--seed)`, split once per compressed block
(fpe_jax.sparse_expansion.run_pipeline: random neuron selections, k-means seeding).
"""

from __future__ import annotations

import dataclasses
import math
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import common, llm_setup
from fpe_jax import experts
from fpe_jax import sparse_expansion as se
from fpe_jax.metrics import wasserstein_to_gaussian

FLAGS = flags.FLAGS

CRITERIA = se.NEURON_SELECTIONS[1:]
llm_setup.define_flags()
flags.DEFINE_list("criteria", list(CRITERIA), f"Neuron selections, from {list(CRITERIA)}.")
flags.DEFINE_float("neuron_fraction", 0.03, "Share of each matrix's neurons pruned.")
flags.DEFINE_float("sparsity", 0.9, "Sparsity of the selected neurons' weights, in [0, 1).")
flags.DEFINE_enum("method", "sparsegpt", ("magnitude", "wanda", "sparsegpt"),
                  "Pruner of the selected neurons.")
flags.DEFINE_integer("num_experts", 4, "K of the expansion run (0: skip it).")
flags.DEFINE_float("expansion_sparsity", 0.5, "Sparsity of the expansion run, in [0, 1).")

common.flag_validator("criteria", lambda v: bool(v) and set(v) <= set(CRITERIA),
                      f"each must be one of {list(CRITERIA)}")
common.flag_validator("neuron_fraction", lambda v: 0 < v <= 1, "must be in (0, 1]")
common.flag_validator("sparsity", lambda v: 0 <= v < 1, "must be in [0, 1)")
common.flag_validator("expansion_sparsity", lambda v: 0 <= v < 1, "must be in [0, 1)")
common.flag_validator("num_experts", lambda v: v >= 0, "must be >= 0 (0: no expansion run)")


@dataclasses.dataclass(frozen=True)
class Config:
  """The binary's flags, read once (`config_from_flags`).

  Attributes:
    setup: the model, calibration and pipeline flags shared with experiments.sparse_expansion.
    criteria: neuron selections of the ablation, from CRITERIA.
    neuron_fraction: share of each FFN matrix's output neurons pruned in the ablation (and
      the share counted as Wasserstein neurons in the expansion statistics).
    sparsity: sparsity of the selected neurons' weights.
    method: their pruner (magnitude, wanda or sparsegpt).
    num_experts: K of the expansion run (0: none).
    expansion_sparsity: sparsity of the expansion run.
  """

  setup: llm_setup.SetupConfig
  criteria: tuple[str, ...]
  neuron_fraction: float
  sparsity: float
  method: str
  num_experts: int
  expansion_sparsity: float


def config_from_flags() -> Config:
  """FLAGS as a Config, with the checks across flags (the only reader of FLAGS).

  Raises:
    common.UsageError: when --num_experts needs more calibration tokens.
  """
  config = Config(setup=llm_setup.setup_config(FLAGS), criteria=tuple(FLAGS.criteria),
                  neuron_fraction=FLAGS.neuron_fraction, sparsity=FLAGS.sparsity,
                  method=FLAGS.method, num_experts=FLAGS.num_experts,
                  expansion_sparsity=FLAGS.expansion_sparsity)
  llm_setup.check_calibration_size(config.setup, config.num_experts or 1)
  return config


def compression_config(config: Config, name: str) -> se.CompressionConfig:
  """The pipeline config of run `name`: "dense", "expansion" or an ablation criterion."""
  if name == "dense":
    return llm_setup.compression_config(config.setup, method="dense")
  if name == "expansion":
    return llm_setup.compression_config(config.setup, method="sparse_expansion",
                                        sparsity=config.expansion_sparsity,
                                        num_experts=config.num_experts)
  return llm_setup.compression_config(config.setup, method=config.method,
                                      sparsity=config.sparsity, neuron_selection=name,
                                      neuron_fraction=config.neuron_fraction)


def expansion_hook(fraction: float):
  """Per-layer WD statistics of a Sparse Expansion run (see the module doc)."""

  def hook(layer, block, x, ffn, info):
    inputs = {"w_gate": (x, info["ids_in"]), "w_up": (x, info["ids_in"]),
              "w_down": (info["inter"], info["ids_mid"])}
    record = {"layer": layer}
    for name, (inp, ids) in inputs.items():
      bank = ffn[name]
      dense = np.asarray(wasserstein_to_gaussian(inp @ block[name]))
      clustered = experts.expert_weighted_wasserstein(
          jnp.broadcast_to(block[name], bank.w.shape), inp, ids)
      expert_wd = experts.expert_weighted_wasserstein(bank.w, inp, ids)
      top = np.argsort(dense)[-max(1, math.ceil(fraction * dense.size)):]
      record[name] = {
          "dense_wd_mean": float(dense.mean()), "dense_wd_top": float(dense[top].mean()),
          "clustered_dense_wd_mean": float(clustered.mean()),
          "clustered_dense_wd_top": float(clustered[top].mean()),
          "expert_wd_mean": float(expert_wd.mean()),
          "expert_wd_top": float(expert_wd[top].mean()),
      }
    return record

  return hook


def ablation_table(dense_ppl: float, rows: list[dict]) -> str:
  lines = ["| neurons pruned | perplexity |", "|---|---|", f"| none (dense) | {dense_ppl:.2f} |"]
  lines += [f"| {r['criterion']} | {r['perplexity']:.2f} |" for r in rows]
  return "\n".join(lines)


def expansion_table(layers: list[dict]) -> str:
  lines = ["| matrix | neurons | dense WD | dense WD per cluster | expert WD |",
           "|---|---|---|---|---|"]
  for name in se.FFN_MATRICES:
    for which in ("top", "mean"):
      vals = [np.mean([r[name][f"{kind}_wd_{which}"] for r in layers])
              for kind in ("dense", "clustered_dense", "expert")]
      label = "Wasserstein (top)" if which == "top" else "all"
      lines.append(f"| {name} | {label} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
  return "\n".join(lines)


def plot(dense_ppl: float, rows: list[dict], config: Config, folder: str) -> str:
  import matplotlib  # noqa: PLC0415 (plots only)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.bar([r["criterion"] for r in rows], [r["perplexity"] for r in rows])
  ax.axhline(dense_ppl, color="k", ls="--", label="dense")
  ax.set_ylabel("held-out perplexity")
  ax.set_title(f"pruning {config.neuron_fraction:.0%} of FFN neurons at {config.sparsity:.0%}")
  ax.legend()
  fig.tight_layout()
  path = f"{folder}/ablation.png"
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main(argv):
  if len(argv) > 1:
    raise common.UsageError(f"unexpected arguments {argv[1:]}; use --flags")
  common.maybe_initialize_distributed()
  config = config_from_flags()
  mesh = llm_setup.calibration_mesh(config.setup, [config.num_experts] if config.num_experts
                                    else [])
  ckpt, calib, held_out, layers, run_dir, done = llm_setup.prepare(
      "wasserstein", __name__, config.setup)
  names = ["dense", *config.criteria] + (["expansion"] if config.num_experts else [])
  progress = common.Progress("wasserstein", len(names), unit="runs")
  t0, records = time.perf_counter(), {}
  # PRNG: every run starts from the same key, jax.random.key(--seed).
  key = jax.random.key(config.setup.seed)
  for name in names:
    if name in done:  # restored from a previous run: done, but not in the rate
      records[name] = done[name]
      progress.skip(1)
      continue
    hook = expansion_hook(config.neuron_fraction) if name == "expansion" else None
    start = time.perf_counter()
    result = se.run_pipeline(key, ckpt.config, ckpt.params, calib, held_out,
                             compression_config(config, name), layers=layers,
                             batch_size=config.setup.batch_size, layer_hook=hook,
                             mesh=mesh)
    records[name] = {"name": name, "perplexity": result.perplexity,
                     "mean_nll": result.mean_nll, "layers": result.layers,
                     "seconds": time.perf_counter() - start}
    run_dir.log(records[name])
    progress.advance(1, f"{name}: ppl {result.perplexity:.2f}")
  dense_ppl = records["dense"]["perplexity"]
  ablation = [{"criterion": c, "perplexity": records[c]["perplexity"]} for c in config.criteria]
  text = ablation_table(dense_ppl, ablation)
  print(text)
  results = {"experiment": "wasserstein", "flags": run_dir.flags_text.splitlines(),
             "config": common.config_record(config), "dense_perplexity": dense_ppl,
             "ablation": ablation, "ablation_table": text, "layers": layers,
             "plots": [plot(dense_ppl, ablation, config, run_dir.plots)]}
  if config.num_experts:
    exp = records["expansion"]
    results["expansion"] = {"num_experts": config.num_experts,
                            "sparsity": config.expansion_sparsity,
                            "perplexity": exp["perplexity"], "per_layer": exp["layers"],
                            "table": expansion_table(exp["layers"])}
    print(results["expansion"]["table"])
  results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  results["seconds"] = time.perf_counter() - t0
  results["caveats"] = llm_setup.CAVEATS
  print(f"results: {run_dir.write_results(results)}")


if __name__ == "__main__":
  common.run(main)
