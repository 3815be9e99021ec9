"""Sparse Expansion vs one-shot pruning on SmolLM2-135M: held-out Austen perplexity.

  python -m experiments.sparse_expansion --flagfile=experiments/flags/sparse_expansion_quick.flags

For every sparsity pattern (--sparsities and --n_m), every method in --methods compresses
the FFNs of --layers block by block (fpe_jax.sparse_expansion) on random calibration
windows of five Austen novels and is scored on consecutive windows of Persuasion. The
dense model is scored once. Each finished configuration is one line of metrics.jsonl; a
restarted run skips those. results.json holds the config (the flags as read, once, by
`config_from_flags`), the rows (each with its compressed FFNs' bytes, `ffn_bytes`), the
perplexity and bytes tables and the caveats; plots/ holds perplexity vs K per sparsity and
the methods side by side. With --save_models each configuration's compressed model is
saved, before its line is logged, under models/ (experiments.compressed_models), for
experiments.lm_eval. Within a configuration, the pipeline's state is checkpointed after
every compressed block (checkpoints/<configuration>/): a killed run resumes after its
last finished block, to the same perplexity.

PRNG streams: the calibration windows are drawn by `numpy.random.default_rng(--seed)`
(fpe_jax.data.austen.random_windows); every configuration's pipeline starts from the same
key `jax.random.key(--seed)`, split once per compressed block
(fpe_jax.sparse_expansion.run_pipeline: k-means seeding).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import resource
import shutil
import time

import jax
import numpy as np
from absl import flags

from experiments import common, compressed_models, llm_setup
from fpe_jax import experts
from fpe_jax import sparse_expansion as se
from fpe_jax.data import gguf_loader
from fpe_jax.models.llama import LlamaConfig

FLAGS = flags.FLAGS

llm_setup.define_flags()
flags.DEFINE_list("methods", ["dense", "magnitude", "wanda", "sparsegpt", "sparse_expansion"],
                  f"Methods, from {list(se.METHODS)}.")
flags.DEFINE_list("sparsities", ["0.5", "0.7"], "Unstructured FFN sparsities, each in [0, 1).")
flags.DEFINE_list("n_m", [], "Semi-structured patterns n:m (prune n of every m), e.g. 2:4.")
flags.DEFINE_list("num_experts", ["2", "4"], "K values for sparse_expansion, each >= 1.")
flags.DEFINE_bool("save_models", False, "Save each configuration's compressed model under "
                  "the run directory, models/<configuration>/ (experiments.compressed_models; "
                  "experiments.lm_eval evaluates and generates with one).")

common.flag_validator("sparsities", lambda v: (s := common.float_list(v)) is not None and all(
    0.0 <= x < 1.0 for x in s), "each must be a number in [0, 1)")
common.flag_validator("n_m", lambda v: all(_n_m(s) is not None for s in v),
                      "each must be n:m with integers 1 <= n < m")
common.flag_validator("num_experts", lambda v: bool(k := common.int_list(v)) and min(k) >= 1,
                      "each must be an integer >= 1")
common.flag_validator("methods", lambda v: bool(v) and set(v) <= set(se.METHODS),
                      f"each must be one of {list(se.METHODS)}")


def _n_m(text: str) -> tuple[int, int] | None:
  """An n:m flag value as (n, m), or None unless it is n:m with integers 1 <= n < m."""
  n_m = common.int_list(text.split(":"))
  return tuple(n_m) if n_m and len(n_m) == 2 and 1 <= n_m[0] < n_m[1] else None


@dataclasses.dataclass(frozen=True)
class Pattern:
  """One sparsity pattern of the sweep.

  Attributes:
    label: its column in the table and its runs' names: "50%" (`common.percent_label`,
      exact: 0.5 and 0.504 are "50%" and "50.4%") or "2:4".
    sparsity: the pruned fraction (n / m for a semi-structured pattern).
    n_m: (n, m) for a semi-structured pattern, None for unstructured.
  """

  label: str
  sparsity: float
  n_m: tuple[int, int] | None = None


DENSE = Pattern("0%", 0.0)


@dataclasses.dataclass(frozen=True)
class Config:
  """The binary's flags, read once (`config_from_flags`).

  Attributes:
    setup: the model, calibration and pipeline flags shared with experiments.wasserstein.
    methods: methods of the sweep, from se.METHODS.
    patterns: --sparsities (unstructured), then --n_m (semi-structured).
    num_experts: the K values of sparse_expansion, sorted, without repeats.
    save_models: save each configuration's compressed model.
  """

  setup: llm_setup.SetupConfig
  methods: tuple[str, ...]
  patterns: tuple[Pattern, ...]
  num_experts: tuple[int, ...]
  save_models: bool = False


@dataclasses.dataclass(frozen=True)
class Run:
  """One configuration of the sweep: a method at a pattern (and K)."""

  name: str
  method: str
  pattern: Pattern
  num_experts: int = 1

  def record(self) -> dict:
    """The run's fields of its row in metrics.jsonl / results.json."""
    return dict(name=self.name, method=self.method, pattern=self.pattern.label,
                sparsity=self.pattern.sparsity,
                n_m=list(self.pattern.n_m) if self.pattern.n_m else None,
                num_experts=self.num_experts)


def config_from_flags() -> Config:
  """FLAGS as a Config, with the checks across flags (the only reader of FLAGS).

  Raises:
    common.UsageError: when a K of --num_experts needs more calibration tokens.
  """
  patterns = [Pattern(common.percent_label(s), s) for s in common.float_list(FLAGS.sparsities)]
  for text in FLAGS.n_m:
    n, m = _n_m(text)
    patterns.append(Pattern(f"{n}:{m}", n / m, (n, m)))
  labels = [p.label for p in patterns]
  common.validate("n_m", len(set(labels)) == len(labels),
                  f"lists one pattern twice ({', '.join(FLAGS.n_m)})")
  config = Config(setup=llm_setup.setup_config(FLAGS), methods=tuple(FLAGS.methods),
                  patterns=tuple(patterns),
                  num_experts=tuple(sorted(set(common.int_list(FLAGS.num_experts)))),
                  save_models=FLAGS.save_models)
  for run in configurations(config):
    llm_setup.check_calibration_size(config.setup, run.num_experts)
  return config


def configurations(config: Config) -> list[Run]:
  """Every run of the sweep: dense once, then per pattern each method (and each K)."""
  runs = [Run("dense", "dense", DENSE)] if "dense" in config.methods else []
  for pattern in config.patterns:
    for method in [m for m in se.METHODS if m in config.methods and m != "dense"]:
      if method == "sparse_expansion":
        runs += [Run(f"{method}/{pattern.label}/K={k}", method, pattern, k)
                 for k in config.num_experts]
      else:
        runs.append(Run(f"{method}/{pattern.label}", method, pattern))
  return runs


def compression_config(config: Config, run: Run) -> se.CompressionConfig:
  return llm_setup.compression_config(
      config.setup, method=run.method, sparsity=run.pattern.sparsity, n_m=run.pattern.n_m,
      num_experts=run.num_experts)


def row_label(run: dict) -> str:
  return run["method"] + (f" K={run['num_experts']}" if run["method"] == "sparse_expansion"
                          else "")


def table(rows: list[dict], cols: list[str]) -> str:
  """Markdown table: one row per method (and K), one column per pattern label in `cols`."""
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


def bytes_table(rows: list[dict]) -> str:
  """Markdown table of what each configuration's compressed FFN weights take (MiB)."""
  formats = ["dense", "stored", "csr", "bitmask", "n_m", "router"]
  lines = ["| configuration | " + " | ".join(formats) + " |", "|---" * (len(formats) + 1) + "|"]
  for row in rows:
    sizes = row.get("ffn_bytes", {})
    cells = [f"{sizes[f] / 2**20:.2f}" if f in sizes else "" for f in formats]
    lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plots(rows: list[dict], pats: list[str], folder: str) -> list[str]:
  """Perplexity vs K per pattern label (SparseGPT as K=1) and the methods side by side."""
  import matplotlib  # noqa: PLC0415 (plots only)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  written = []
  dense = [r["perplexity"] for r in rows if r["method"] == "dense"]
  fig, ax = plt.subplots(figsize=(6, 4))
  for label in pats:
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


def _layer_bytes(n_m, layer, block, x, ffn, info) -> dict:
  """run_pipeline's layer hook: the storage bytes of each compressed FFN bank (the router
  that w_up shares with w_gate counted once)."""
  del block, x, info
  sizes = [experts.storage_bytes(bank, n_m=n_m) for bank in ffn.values()]
  if ffn["w_up"].router is ffn["w_gate"].router:
    sizes[list(ffn).index("w_up")]["router"] = 0
  return {"layer": layer, "bytes": sizes}


def ffn_bytes(layer_records: list[dict], model: LlamaConfig, layers: list[int]) -> dict:
  """Bytes of the compressed blocks' FFN weights, summed over layers and matrices:
  "dense" (what they cost uncompressed, float32), and for a compressed configuration
  "stored" (its K dense copies), "csr", "bitmask", "n_m" (experts.storage_bytes) and
  "router". The dense row has "dense" only."""
  totals = {"dense": len(layers) * 3 * model.d_model * model.d_ff * 4}
  for record in layer_records:
    for bank_bytes in record["bytes"]:
      for fmt, size in bank_bytes.items():
        if fmt != "dense":
          totals[fmt] = totals.get(fmt, 0) + size
  return totals


def check_patterns(patterns, model: LlamaConfig) -> None:
  """Every n:m pattern groups whole rows of the FFN matrices it prunes: m divides their
  inputs (d_model for gate and up, d_ff for down). Checked before anything runs, not when
  the first n:m configuration is reached."""
  for p in patterns:
    if p.n_m is not None:
      m = p.n_m[1]
      common.validate("n_m", model.d_model % m == 0 and model.d_ff % m == 0,
                      f"{p.label}: m={m} must divide the FFN inputs d_model={model.d_model} "
                      f"and d_ff={model.d_ff}")


def main(argv):
  if len(argv) > 1:
    raise common.UsageError(f"unexpected arguments {argv[1:]}; use --flags")
  common.maybe_initialize_distributed()
  config = config_from_flags()
  runs = configurations(config)
  mesh = llm_setup.calibration_mesh(config.setup, [r.num_experts for r in runs
                                                   if r.method == "sparse_expansion"])
  ckpt, calib, held_out, layers, run_dir, done = llm_setup.prepare(
      "sparse_expansion", __name__, config.setup,
      check_model=functools.partial(check_patterns, config.patterns))
  base_model = None
  if config.save_models:  # what every saved model records of the GGUF it was made from
    path = config.setup.model_path or str(gguf_loader.smollm2_gguf_path())
    base_model = {"path": path, "sha256": compressed_models.file_sha256(path)}
  progress = common.Progress("sparse_expansion", len(runs), unit="runs")
  t0, rows = time.perf_counter(), []
  for run in runs:
    blocks_dir = os.path.join(run_dir.checkpoints, compressed_models.folder_name(run.name))
    if run.name in done:  # restored from a previous run: done, but not in the rate
      shutil.rmtree(blocks_dir, ignore_errors=True)  # killed between its log and this
      rows.append(done[run.name])
      progress.skip(1)
      continue
    start = time.perf_counter()
    blocks = compressed_models.BlockCheckpoints(blocks_dir)
    resume = blocks.latest(keep_ffns=config.save_models)
    if resume is not None:
      print(f"{run.name}: resuming after block {resume.blocks_done}/{len(layers)}", flush=True)
    block_progress = common.Progress(run.name, len(layers), unit="blocks")
    block_progress.skip(resume.blocks_done if resume else 0)
    # PRNG: every configuration starts from the same key, jax.random.key(--seed).
    result = se.run_pipeline(jax.random.key(config.setup.seed), ckpt.config, ckpt.params, calib,
                             held_out, compression_config(config, run), layers=layers,
                             batch_size=config.setup.batch_size, keep_ffns=config.save_models,
                             layer_hook=functools.partial(_layer_bytes, run.pattern.n_m),
                             resume=resume, on_block=blocks.save, mesh=mesh,
                             progress=lambda done, _, p=block_progress: p.update(done))
    row = {**run.record(), "perplexity": result.perplexity, "mean_nll": result.mean_nll,
           "ffn_bytes": ffn_bytes(result.layers, ckpt.config, layers),
           "seconds": time.perf_counter() - start}
    if config.save_models:  # saved before it is logged: a logged configuration has its model
      compressed_models.save(
          os.path.join(run_dir.path, "models", compressed_models.folder_name(run.name)),
          result.ffns,
          {"configuration": run.record(), "setup": common.config_record(config.setup),
           "base_model": base_model, "perplexity": result.perplexity,
           "mean_nll": result.mean_nll})
    run_dir.log(row)
    blocks.delete()
    rows.append(row)
    progress.advance(1, f"{run.name}: ppl {result.perplexity:.2f}")
  pats = [p.label for p in config.patterns]
  text = table(rows, pats)
  print(text)
  sizes = bytes_table(rows)
  print(f"FFN weights of the compressed blocks, MiB (float32; csr, bitmask, n_m: what those "
        f"formats would take):\n{sizes}")
  written = plots(rows, pats, run_dir.plots)
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  results = {"experiment": "sparse_expansion", "flags": run_dir.flags_text.splitlines(),
             "config": common.config_record(config), "rows": rows, "table": text,
             "bytes_table": sizes,
             "layers": layers, "calibration_tokens": int(calib.size),
             "eval_tokens": int(held_out.size), "peak_rss_mb": peak_mb, "plots": written,
             "caveats": llm_setup.CAVEATS, "seconds": time.perf_counter() - t0}
  path = run_dir.write_results(results)
  print(f"peak host memory {peak_mb:.0f} MB; results: {path}")


if __name__ == "__main__":
  common.run(main)
