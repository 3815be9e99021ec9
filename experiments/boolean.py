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
"""

import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import boolean_plots, common
from fpe_jax import fpe, metrics, nn, sharding, train
from fpe_jax.tasks import boolean as dnf

FLAGS = flags.FLAGS
SPLIT_CHOICES = ("dense",) + fpe.SPLITS

flags.DEFINE_integer("d", 64, "Input variables.")
flags.DEFINE_integer("k", 3, "Literals per clause.")
flags.DEFINE_list("clauses", ["8"], "Clause counts to sweep (polysemantic load).")
flags.DEFINE_list("neurons", ["8"], "Widths of the expanded hidden layer before expansion.")
flags.DEFINE_list("alphas", ["2"], "Expansion factors (children per neuron), each >= 2.")
flags.DEFINE_list("splits", ["dense", "random", "clause"],
                  f"Arms: 'dense' (baseline) and FPE splits, among {SPLIT_CHOICES}.")
flags.DEFINE_integer("depth", 1, "Hidden layers; each has the width from --neurons.")
flags.DEFINE_integer("layer", 0, "Hidden layer to expand (0 = first).")
flags.DEFINE_integer("seeds", 5, "Seeds per sweep point (formula, data and init differ).")
flags.DEFINE_integer("seed", 0, "Base seed; every key derives from it.")
flags.DEFINE_integer("train_size", 4096, "Training examples per run (a fixed set).")
flags.DEFINE_integer("test_size", 4096, "Fresh test examples per run.")
flags.DEFINE_integer("batch_size", 64, "Minibatch size.")
flags.DEFINE_enum("optimizer", "adam", train.OPTIMIZERS, "Optimiser.")
flags.DEFINE_float("learning_rate", 1e-3, "Learning rate.")
flags.DEFINE_integer("warmup_steps", 200, "Dense steps before the expansion (split early).")
flags.DEFINE_integer("steps", 20000, "Steps after the expansion (the dense baseline too).")
flags.DEFINE_integer("chunk_steps", 1000,
                     "Steps per jitted call: the log and checkpoint period.")
flags.DEFINE_enum("bias", "copy", fpe.BIAS_MODES, "Child biases.")
flags.DEFINE_enum("budget", "global", fpe.BUDGET_MODES, "Budget-restoring prune.")
flags.DEFINE_enum("matmul", "xla", ("xla", "pallas"),
                  "Masked matmuls of the FPE arms: XLA (w * mask), or the block-sparse Pallas "
                  "kernel (kernels_pallas; interpret mode on CPU, for checking only).")


def _int_list(values):
  try:
    return [int(v) for v in values]
  except ValueError:
    return None


common.flag_validator("clauses", lambda v: (x := _int_list(v)) and min(x) >= 1,
                      "a comma list of integers >= 1, e.g. 4,8,16")
common.flag_validator("neurons", lambda v: (x := _int_list(v)) and min(x) >= 1,
                      "a comma list of integers >= 1, e.g. 8,16")
common.flag_validator("alphas", lambda v: (x := _int_list(v)) and min(x) >= 2,
                      "a comma list of integers >= 2 (children per neuron), e.g. 2,4")
common.flag_validator("splits", lambda v: bool(v) and set(v) <= set(SPLIT_CHOICES),
                      f"a comma list of splits among {', '.join(SPLIT_CHOICES)}")
for _name in ("d", "k", "depth", "seeds", "train_size", "test_size", "batch_size",
              "steps", "chunk_steps"):
  common.flag_validator(_name, lambda v: v >= 1, "must be >= 1")
common.flag_validator("warmup_steps", lambda v: v >= 0, "must be >= 0")
common.flag_validator("learning_rate", lambda v: v > 0, "must be > 0")
flags.register_multi_flags_validator(
    ["k", "d"], lambda f: f["k"] <= f["d"],
    message="--k: a clause needs k distinct variables, so k must be <= --d")
flags.register_multi_flags_validator(
    ["layer", "depth"], lambda f: 0 <= f["layer"] < f["depth"],
    message="--layer: must index a hidden layer, in [0, --depth - 1]")
flags.register_multi_flags_validator(
    ["splits", "layer"], lambda f: "clause" not in f["splits"] or f["layer"] == 0,
    message="--splits: 'clause' splits variables, so it needs --layer=0")
flags.register_multi_flags_validator(
    ["steps", "chunk_steps"], lambda f: f["steps"] % f["chunk_steps"] == 0,
    message="--steps: must be a multiple of --chunk_steps")
flags.register_multi_flags_validator(
    ["warmup_steps", "chunk_steps"],
    lambda f: f["warmup_steps"] < f["chunk_steps"] or f["warmup_steps"] % f["chunk_steps"] == 0,
    message="--warmup_steps: must be below --chunk_steps (one chunk) or a multiple of it")


class Config:
  """The flags, parsed into the sweep."""

  def __init__(self):
    self.clauses = sorted(set(_int_list(FLAGS.clauses)))
    self.neurons = sorted(set(_int_list(FLAGS.neurons)))
    self.alphas = sorted(set(_int_list(FLAGS.alphas)))
    self.fpe_splits = [s for s in fpe.SPLITS if s in FLAGS.splits]
    self.seeds = list(range(FLAGS.seeds))


# ----------------------------------------------------------------------------- data


def run_key(clauses: int, seed: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(FLAGS.seed), seed), clauses)


@functools.cache
def task(clauses: int, seed: int):
  """The formula and its train/test sets of one (clause count, seed): shared by widths."""
  key = run_key(clauses, seed)
  formula = dnf.sample_formula(jax.random.fold_in(key, 0), d=FLAGS.d, n_clauses=clauses,
                               k=FLAGS.k)
  train_set = dnf.sample_balanced(jax.random.fold_in(key, 1), formula, FLAGS.train_size)
  test_set = dnf.sample_balanced(jax.random.fold_in(key, 2), formula, FLAGS.test_size)
  return formula, train_set, test_set


def stacked_data(points):
  """Train/test arrays for a list of (clauses, seed) run points, stacked on a run axis."""
  tasks = [task(c, s) for c, s in points]
  stack = lambda i, j: jnp.stack([t[i][j] for t in tasks])
  return stack(1, 0), stack(1, 1), stack(2, 0), stack(2, 1)


# ------------------------------------------------------------------------- training


def sizes(width: int) -> list[int]:
  return [FLAGS.d] + [width] * FLAGS.depth + [1]


def make_optimizer():
  return train.make_optimizer(FLAGS.optimizer, FLAGS.learning_rate)


@functools.cache
def train_program(chunk_steps: int):
  """The jitted, run-vmapped chunk of `chunk_steps` steps (compiled once per shape)."""
  devices = len(jax.devices())
  batch_sharding = sharding.batch_sharding(sharding.make_mesh(), 2) if devices > 1 else None
  chunk = train.make_train_chunk(nn.apply_mlp, train.sigmoid_bce, make_optimizer(),
                                 batch_size=FLAGS.batch_size, steps=chunk_steps,
                                 batch_sharding=batch_sharding)
  return jax.jit(jax.vmap(chunk), donate_argnums=0)


def stack_trees(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack_tree(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


class Trainer:
  """Runs the phases of one run directory with checkpoints, logs and progress."""

  def __init__(self, run_dir: common.RunDir, total_steps: int):
    self.run_dir = run_dir
    self.progress = common.Progress("boolean", total_steps)
    self.done_steps = 0
    self.optimizer = make_optimizer()

  def train(self, phase: str, state: train.TrainState, points, keys, end_step: int,
            kernel: bool = False):
    """Trains a stacked state from its step to `end_step`, resuming from checkpoints.

    With `kernel`, the weight masks (fixed during the phase) are turned once into
    block-sparse kernel masks for the jitted chunks; checkpoints keep the plain masks.
    """
    x, y, _, _ = stacked_data(points)
    plain_masks = state.masks
    first = int(state.step[0])
    store, state, start = self.run_dir.resume(phase, state, first_step=first)
    self.done_steps += start - first
    if kernel:
      state = state._replace(masks=kernel_masks(plain_masks))
    state = jax.tree.map(jnp.copy, state)  # the chunks donate their input: keep the caller's
    chunk = min(FLAGS.chunk_steps, end_step - first)
    chunk_fn = train_program(chunk)
    t0 = time.perf_counter()
    for step in range(start + chunk, end_step + 1, chunk):
      state, loss = chunk_fn(state, x, y, keys)
      loss = np.asarray(loss)
      self.done_steps += chunk
      self.run_dir.log({"phase": phase, "step": step, "runs": len(points),
                        "loss_mean": float(loss.mean()), "loss_max": float(loss.max()),
                        "seconds": round(time.perf_counter() - t0, 3)})
      store.save(step, state._replace(masks=plain_masks))
      self.progress.update(self.done_steps, f"[{phase} loss {loss.mean():.4f}]")
    store.close()
    return state._replace(masks=plain_masks)


def kernel_masks(masks: nn.Masks) -> nn.Masks:
  """Run-stacked weight masks as block-sparse kernel masks (host-side metadata, once)."""
  from kernels_pallas.block_sparse import BlockSparseMask

  return {name: {**m, "w": BlockSparseMask.from_masks(np.asarray(m["w"]),
                                                      implementation="pallas")}
          for name, m in masks.items()}


def init_states(optimizer, params, masks):
  return stack_trees([train.init_state(p, m, optimizer) for p, m in zip(params, masks,
                                                                        strict=True)])


def train_width(trainer: Trainer, cfg: Config, width: int) -> list[dict]:
  """All phases of one width; returns one evaluation record per run."""
  points = list(itertools.product(cfg.clauses, cfg.seeds))
  keys = jnp.stack([jax.random.fold_in(run_key(c, s), 4) for c, s in points])
  params = [nn.init_mlp(jax.random.fold_in(jax.random.fold_in(run_key(c, s), 3), width),
                        sizes(width)) for c, s in points]
  masks = [nn.full_masks(p) for p in params]
  optimizer = trainer.optimizer
  warm = init_states(optimizer, params, masks)
  if FLAGS.warmup_steps:
    warm = trainer.train(f"h{width}_warmup", warm, points, keys, FLAGS.warmup_steps)
  records = []
  if "dense" in FLAGS.splits:
    # The baseline keeps its optimiser state: it is the same model trained on.
    dense = trainer.train(f"h{width}_dense", warm, points, keys,
                          FLAGS.warmup_steps + FLAGS.steps)
    records += evaluate(dense, points, width, split="dense", alpha=1)
  for alpha in cfg.alphas:
    arms = list(itertools.product(cfg.fpe_splits, range(len(points))))
    if not arms:
      continue
    expanded_params, expanded_masks = [], []
    for split, i in arms:
      c, s = points[i]
      formula = task(c, s)[0]
      p, m = fpe.expand(unstack_tree(warm.params, i), unstack_tree(warm.masks, i),
                        layer=FLAGS.layer, alpha=alpha, split=split,
                        key=jax.random.fold_in(run_key(c, s), 5), clauses=formula.variables,
                        clause_signs=formula.signs, bias=FLAGS.bias, budget=FLAGS.budget)
      assert nn.count_nonzero(p, m) == nn.count_nonzero(unstack_tree(warm.params, i),
                                                        unstack_tree(warm.masks, i))
      expanded_params.append(p)
      expanded_masks.append(m)
    # A fresh optimiser, but the step count (the minibatch keys) continues from the
    # warm-up, so every arm sees the same minibatches as the dense baseline after it.
    state = init_states(optimizer, expanded_params, expanded_masks)._replace(
        step=jnp.full((len(arms),), FLAGS.warmup_steps, jnp.int32))
    arm_points = [points[i] for _, i in arms]
    arm_keys = jnp.stack([keys[i] for _, i in arms])
    state = trainer.train(f"h{width}_alpha{alpha}", state, arm_points, arm_keys,
                          FLAGS.warmup_steps + FLAGS.steps, kernel=FLAGS.matmul == "pallas")
    for split in cfg.fpe_splits:
      idx = [j for j, (sp, _) in enumerate(arms) if sp == split]
      sub = jax.tree.map(lambda a, idx=idx: a[np.asarray(idx)], state)
      records += evaluate(sub, [arm_points[j] for j in idx], width, split=split, alpha=alpha)
  return records


# ----------------------------------------------------------------------- evaluation


def evaluate(state: train.TrainState, points, width: int, *, split: str, alpha: int):
  """Test accuracy and interference metrics of each run of a stacked state."""
  _, _, x_test, y_test = stacked_data(points)
  acc = jax.jit(jax.vmap(functools.partial(train.accuracy, nn.apply_mlp)))(
      state.params, state.masks, x_test, y_test)
  records = []
  for i, (c, s) in enumerate(points):
    params, masks = unstack_tree(state.params, i), unstack_tree(state.masks, i)
    name = nn.layer_name(FLAGS.layer)
    w = params[name]["w"]  # the expanded layer's incoming weights [d_in, width * alpha]
    formula = task(c, s)[0]
    hidden = nn.hidden_activations(params, masks, x_test[i])[FLAGS.layer]
    records.append({
        "neurons": width, "clauses": c, "seed": s, "split": split, "alpha": alpha,
        "accuracy": float(acc[i]),
        "capacity": float(jnp.mean(metrics.feature_capacity(w))),
        "abs_cosine": float(metrics.mean_pairwise_cosine(w, absolute=True)),
        "cosine": float(metrics.mean_pairwise_cosine(w)),
        "clause_load": float(jnp.mean(metrics.clause_load(
            hidden, dnf.clause_satisfaction(formula, x_test[i])))) if FLAGS.layer == 0 else None,
        "nonzero": nn.count_nonzero(params, masks),
    })
  return records


def summarize(records: list[dict]) -> dict:
  """Mean and std over seeds per sweep point, gains over dense, and the paper's claims."""
  groups = {}
  for r in records:
    groups.setdefault((r["neurons"], r["clauses"], r["split"], r["alpha"]), []).append(r)
  dense = {(h, c): {r["seed"]: r for r in rs}
           for (h, c, sp, _), rs in groups.items() if sp == "dense"}
  points = []
  order = lambda item: (item[0][0], item[0][1], SPLIT_CHOICES.index(item[0][2]), item[0][3])
  for (h, c, split, alpha), rs in sorted(groups.items(), key=order):
    rs = sorted(rs, key=lambda r: r["seed"])
    point = {"neurons": h, "clauses": c, "split": split, "alpha": alpha,
             "seeds": [r["seed"] for r in rs], "nonzero": rs[0]["nonzero"]}
    for key in ("accuracy", "capacity", "abs_cosine", "cosine", "clause_load"):
      values = [r[key] for r in rs if r[key] is not None]
      if values:
        point[key] = _stats(values)
    if split != "dense" and (h, c) in dense:
      base = dense[(h, c)]
      point["accuracy_gain"] = _stats([r["accuracy"] - base[r["seed"]]["accuracy"] for r in rs])
      point["capacity_fold"] = _stats([r["capacity"] / base[r["seed"]]["capacity"] for r in rs])
      point["abs_cosine_fold"] = _stats(
          [r["abs_cosine"] / base[r["seed"]]["abs_cosine"] for r in rs])
    points.append(point)
  return {"points": points, "claims": claims(points)}


def _stats(values):
  values = np.asarray(values, np.float64)
  return {"mean": float(values.mean()), "std": float(values.std()),
          "per_seed": [float(v) for v in values]}


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
  devices = len(jax.devices())
  common.validate("batch_size", FLAGS.batch_size % devices == 0,
                  f"must be divisible by the {devices} devices of the data mesh")
  cfg = Config()
  for c in cfg.clauses:  # fail before writing anything if a point cannot be sampled
    dnf.sample_formula(run_key(c, 0), d=FLAGS.d, n_clauses=c, k=FLAGS.k)
  run_dir = common.RunDir("boolean", __name__).open()
  print(f"run directory {run_dir.path}" + (" (resuming)" if run_dir.resumed else ""))
  arms_per_width = ("dense" in FLAGS.splits) + bool(cfg.fpe_splits) * len(cfg.alphas)
  steps_per_width = FLAGS.warmup_steps + arms_per_width * FLAGS.steps
  trainer = Trainer(run_dir, steps_per_width * len(cfg.neurons))
  t0 = time.perf_counter()
  records = []
  for width in cfg.neurons:
    records += train_width(trainer, cfg, width)
  summary = summarize(records)
  results = {"experiment": "boolean", "flags": run_dir.flags_text.splitlines(),
             "devices": devices, **summary}
  print(table(summary["points"]))
  print("claims:", summary["claims"])
  boolean_plots.write_all(summary["points"], run_dir.plots)
  path = run_dir.write_results(results)
  print(f"results: {path} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
  common.run(main)
