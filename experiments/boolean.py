r"""FPE on Boolean DNF tasks: dense vs split-neuron MLPs at the same count of non-zeros.

  python -m experiments.boolean --flagfile=experiments/flags/boolean_quick.flags

For every width h in --neurons: a dense MLP [d, h, 1] is warmed up for --warmup_steps
(all clause counts and seeds in one vmapped program), then
  - dense: keeps training for --steps (the baseline, same total steps),
  - each alpha in --alphas: every split in --splits expands hidden layer --layer of the
    warmed-up model (fpe.expand: children, then magnitude pruning back to the exact
    non-zero count) and trains for --steps with a fresh optimiser,
all (clause count x split x seed) runs of one shape batched by vmap into one program.
Test accuracy and interference metrics (feature capacity, pairwise cosine of the
neurons' incoming weights, clause load) of the expanded layer go to results.json.

The sweep (phases, checkpoints, evaluation, mean ± std, gains paired by seed) is
experiments/fpe_sweep.py; this binary holds the task (formulas and their data sets, one
per (clause count, seed) run), the clause split's formula and the paper's claims.
"""

import dataclasses
import functools
import itertools
import math
import time

import jax
import jax.numpy as jnp
from absl import flags

from experiments import boolean_plots, common, fpe_sweep
from fpe_jax import fpe, metrics, nn, train
from fpe_jax.tasks import boolean as dnf

FLAGS = flags.FLAGS
SPLIT_CHOICES = ("dense",) + fpe.SPLITS

flags.DEFINE_integer("d", 64, "Input variables.")
flags.DEFINE_integer("k", 3, "Literals per clause.")
flags.DEFINE_list("clauses", ["8"], "Clause counts to sweep (polysemantic load).")
flags.DEFINE_list("neurons", ["8"], "Widths of the expanded hidden layer before expansion.")
flags.DEFINE_list("splits", ["dense", "random", "clause"],
                  f"Arms: 'dense' (baseline) and FPE splits, among {SPLIT_CHOICES}.")
flags.DEFINE_integer("depth", 1, "Hidden layers; each has the width from --neurons.")
flags.DEFINE_integer("layer", 0, "Hidden layer to expand (0 = first).")
flags.DEFINE_integer("train_size", 4096, "Training examples per run (a fixed set).")
flags.DEFINE_integer("test_size", 4096, "Fresh test examples per run.")
# --alphas, the training recipe and --matmul: the flags of every FPE binary.
fpe_sweep.define_training_flags(alphas=["2"], seeds=5, warmup_steps=200, steps=20000,
                                chunk_steps=1000, batch_size=64)

common.flag_validator("clauses", lambda v: (x := common.int_list(v)) and min(x) >= 1,
                      "a comma list of integers >= 1, e.g. 4,8,16")
common.flag_validator("neurons", lambda v: (x := common.int_list(v)) and min(x) >= 1,
                      "a comma list of integers >= 1, e.g. 8,16")
common.flag_validator("splits", lambda v: bool(v) and set(v) <= set(SPLIT_CHOICES),
                      f"a comma list of splits among {', '.join(SPLIT_CHOICES)}")
for _name in ("d", "k", "depth"):
  common.flag_validator(_name, lambda v: v >= 1, "must be >= 1")
for _name in ("train_size", "test_size"):
  common.flag_validator(_name, lambda v: v >= 2, "must be >= 2 (a balanced set of both classes)")


@dataclasses.dataclass(frozen=True)
class Config:
  """The Boolean binary's flags, read once (`config_from_flags`).

  Attributes:
    d: input variables.
    k: literals per clause.
    clauses: clause counts swept.
    depth: hidden layers.
    layer: the hidden layer FPE expands.
    train_size: training examples per run.
    test_size: test examples per run.
    sweep: the sweep (widths: --neurons, arms: --splits).
  """
  d: int
  k: int
  clauses: tuple[int, ...]
  depth: int
  layer: int
  train_size: int
  test_size: int
  sweep: fpe_sweep.SweepConfig


def config_from_flags() -> Config:
  """The config of the parsed flags; raises `common.UsageError` on a bad combination."""
  f = FLAGS
  common.validate("k", f.k <= f.d, "a clause needs k distinct variables, so k must be <= --d")
  distinct = math.comb(f.d, f.k) * 2**f.k  # k variables of d, each literal signed
  common.validate("clauses", max(common.int_list(f.clauses)) <= distinct,
                  f"a formula has at most {distinct} distinct clauses of --k={f.k} literals "
                  f"on --d={f.d} variables")
  common.validate("layer", 0 <= f.layer < f.depth,
                  "must index a hidden layer, in [0, --depth - 1]")
  common.validate("splits", "clause" not in f.splits or f.layer == 0,
                  "'clause' splits variables, so it needs --layer=0")
  sweep = fpe_sweep.sweep_config(f, widths=common.int_list(f.neurons), arms=f.splits)
  return Config(d=f.d, k=f.k, clauses=tuple(sorted(set(common.int_list(f.clauses)))),
                depth=f.depth, layer=f.layer, train_size=f.train_size, test_size=f.test_size,
                sweep=sweep)


# ----------------------------------------------------------------------------- task


def run_key(seed: int, clauses: int, s: int) -> jax.Array:
  """The key of run (clauses, s): its formula (fold_in 0), training set (1), test set (2)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), s), clauses)


def clause_load(formula: dnf.Formula, x_test: jax.Array, params, masks) -> dict:
  """Mean clause load of the first hidden layer's neurons on `x_test: [n, d]`."""
  hidden = nn.hidden_activations(params, masks, x_test)[0]
  load = metrics.clause_load(hidden, dnf.clause_satisfaction(formula, x_test))
  return {"clause_load": float(jnp.mean(load))}


def boolean_task(cfg: Config) -> fpe_sweep.Task:
  """Every (clause count, seed) run with its formula and its balanced train and test sets."""
  runs, train_sets, test_sets = [], [], []
  for c, s in itertools.product(cfg.clauses, range(cfg.sweep.seeds)):
    key = run_key(cfg.sweep.seed, c, s)
    formula = dnf.sample_formula(jax.random.fold_in(key, 0), d=cfg.d, n_clauses=c, k=cfg.k)
    train_sets.append(dnf.sample_balanced(jax.random.fold_in(key, 1), formula, cfg.train_size))
    test_sets.append(dnf.sample_balanced(jax.random.fold_in(key, 2), formula, cfg.test_size))
    runs.append(fpe_sweep.Run(
        key=key, labels={"clauses": c, "seed": s},
        expand_args={"clauses": formula.variables, "clause_signs": formula.signs},
        # Clauses are sets of input variables: their load is measured on the first layer.
        extra_metrics=(functools.partial(clause_load, formula, test_sets[-1][0])
                       if cfg.layer == 0 else None)))
  stack = lambda sets, j: jnp.stack([xy[j] for xy in sets])
  data = fpe_sweep.TaskData(stack(train_sets, 0), stack(train_sets, 1), stack(test_sets, 0),
                            stack(test_sets, 1), num_classes=2)
  spec = fpe_sweep.ModelSpec(head_sizes=lambda h: [cfg.d] + [h] * cfg.depth + [1],
                             expand_layers=(cfg.layer,), split_init_key=False)
  return fpe_sweep.Task("", spec, data, tuple(runs), objective=train.sigmoid_bce,
                        per_run_data=True)


# ------------------------------------------------------------------ summary, claims


POINT = dict(by=("width", "clauses", "arm", "alpha"),
             metrics=("accuracy", "capacity", "abs_cosine", "cosine", "clause_load",
                      "block_density"),
             order=lambda r: (r["width"], r["clauses"], SPLIT_CHOICES.index(r["arm"]),
                              r["alpha"]))


def published(point: dict) -> dict:
  """A sweep point under the Boolean grid's names: "neurons" (width) and "split" (arm)."""
  point = dict(point)
  point["neurons"], point["split"] = point.pop("width"), point.pop("arm")
  return point


def claims(points: list[dict]) -> dict:
  """The paper's qualitative claims, checked on whatever part of the grid was run."""
  acc = {(p["neurons"], p["clauses"], p["split"], p["alpha"]): p["accuracy"]["mean"]
         for p in points}
  gain = {(p["neurons"], p["clauses"], p["split"], p["alpha"]): p["accuracy_gain"]["mean"]
          for p in points if "accuracy_gain" in p}
  fpe_points = [p for p in points if "accuracy_gain" in p]
  out = {}
  head = {s: acc.get((8, 8, s, 1 if s == "dense" else 2)) for s in ("dense", "random", "clause")}
  if all(v is not None for v in head.values()):
    out["headline_clause_gt_random_gt_dense"] = head["clause"] > head["random"] > head["dense"]
    out["headline_clause_minus_dense_ge_10_points"] = head["clause"] - head["dense"] >= 0.10
  for split in ("random", "clause"):
    by_h = {}
    for (h, c, sp, a), g in gain.items():
      if sp == split and a == 2:
        by_h.setdefault(h, []).append((c, g))
    rising = [_monotone([g for _, g in sorted(v)], +1) for v in by_h.values() if len(v) > 1]
    if rising:
      out[f"{split}_gain_grows_with_clauses_at_fixed_neurons"] = all(rising)
    by_c = {}
    for (h, c, sp, a), g in gain.items():
      if sp == split and a == 2:
        by_c.setdefault(c, []).append((h, g))
    falling = [_monotone([g for _, g in sorted(v)], -1) for v in by_c.values() if len(v) > 1]
    if falling:
      out[f"{split}_gain_shrinks_with_neurons_at_fixed_clauses"] = all(falling)
    pairs = [(gain[(h, c, split, 4)], g) for (h, c, sp, a), g in gain.items()
             if sp == split and a == 2 and (h, c, split, 4) in gain]
    if pairs:
      out[f"{split}_alpha4_ge_alpha2"] = all(g4 >= g2 for g4, g2 in pairs)
  if fpe_points:
    out["fpe_capacity_up"] = all(p["capacity_fold"]["mean"] > 1 for p in fpe_points)
    out["fpe_abs_cosine_down"] = all(p["abs_cosine_fold"]["mean"] < 1 for p in fpe_points)
  return out


def _monotone(values, sign):
  return all(sign * (b - a) >= 0 for a, b in itertools.pairwise(values))


def table(points: list[dict]) -> str:
  lines = ["neurons clauses split    alpha  accuracy (mean ± std)  gain      capacity  |cos|"]
  for p in points:
    gain = p.get("accuracy_gain")
    lines.append(
        f"{p['neurons']:7d} {p['clauses']:7d} {p['split']:8s} {p['alpha']:5d}  "
        f"{100 * p['accuracy']['mean']:6.1f} ± {100 * p['accuracy']['std']:4.1f}         "
        + (f"{100 * gain['mean']:+6.1f}   " if gain else "          ")
        + f"{p['capacity']['mean']:.3f}     {p['abs_cosine']['mean']:.3f}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv):
  if len(argv) > 1:
    raise common.UsageError(f"unexpected arguments {argv[1:]}; use --flags")
  common.maybe_initialize_distributed()
  cfg = config_from_flags()
  run_dir = common.RunDir("boolean", __name__).check()
  t0 = time.perf_counter()
  with common.blame("clauses"):  # a class too rare to sample: too many or too short clauses
    task = boolean_task(cfg)  # every formula and data set, before anything is written
  records = fpe_sweep.train_and_evaluate(run_dir, [task], cfg.sweep)
  points = [published(p) for p in fpe_sweep.summarize(records, **POINT)]
  results = {"experiment": "boolean", "flags": run_dir.flags_text.splitlines(),
             "config": common.config_record(cfg), "devices": len(jax.devices()),
             "points": points, "claims": claims(points)}
  print(table(points))
  print("claims:", results["claims"])
  boolean_plots.write_all(points, run_dir.plots)
  path = run_dir.write_results(results)
  print(f"results: {path} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
  common.run(main)
