"""FPE against its baselines at an equal count of non-zero parameters, on real data.

Shared by `experiments.embeddings` (MLP heads on frozen MiniLM embeddings) and
`experiments.deep` (a deep MLP and a CNN on Fashion-MNIST). Not a binary: it defines no
flags; the binaries parse theirs into a `Settings`.

A model is a two-level params dict: an MLP head `dense_0 .. dense_L` (`fpe_jax.nn`
layout) plus, for the CNN, trainable backbone entries (`conv1`, `conv2`); its mask tree
mirrors it (backbone masks all ones). `fpe.expand` sees the head only.

Arms, for each base width h (every arm has exactly the non-zero count of dense width h,
except the larger dense models that measure the "equivalent dense size"):
- dense: width h, --warmup_steps then --steps more (the optimiser state carries on).
- random / feature / overlap, for each alpha: the warmed-up dense model expanded
  (`fpe.expand` over `ModelSpec.expand_layers` under one budget), then --steps with a
  fresh optimiser. The minibatch sequence continues from the warm-up, so every arm of a
  seed sees the same minibatches as the dense baseline.
- dropconnect, for each alpha: the warmed-up dense model trained --steps more with a
  fresh Bernoulli mask each step on the expanded layers' incoming weights, each weight
  kept with probability 1/alpha (the share of a parent's inputs one FPE child keeps) and
  scaled by alpha (inverted DropConnect); all weights at test time. This is our reading of
  the paper's "DropConnect at the same budget": the very same non-zero parameters as
  dense, regularised by random sparsity instead of FPE's fixed split (the optimiser
  state carries on from the warm-up, as for dense).
- dense x r for r in --dense_ratios: the dense model whose head width gives the non-zero
  count nearest r times dense width h's, trained from scratch for warm-up + steps.

Equivalent dense size of an arm: where its mean accuracy falls on the dense family of
its width (1x, then each ratio), by linear interpolation in log(non-zeros) between the
family's envelope points (each more accurate than every smaller model); at or below the
first or above the best it is reported as a bound ("<=" / ">=").
"""

import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from fpe_jax import fpe, metrics, nn, sharding, train

FPE_SPLITS = ("random", "feature", "overlap")
ARMS = ("dense",) + FPE_SPLITS + ("dropconnect",)


class ModelSpec(NamedTuple):
  """What a task's model is.

  Attributes:
    head_sizes: width -> the head's layer sizes `[d_in, h, ..., h, num_classes]`.
    expand_layers: hidden layers of the head that FPE expands (one global budget).
    init_backbone: key -> backbone params `{name: {"w", "b"}}` (None: no backbone).
    backbone: (backbone params, x [n, ...]) -> features [n, head d_in].
  """
  head_sizes: Callable[[int], list[int]]
  expand_layers: tuple[int, ...]
  init_backbone: Callable[[jax.Array], dict] | None = None
  backbone: Callable[[dict, jax.Array], jax.Array] | None = None


class TaskData(NamedTuple):
  """Train and test arrays of one task (numpy; the binaries put them on device)."""
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int


class Settings(NamedTuple):
  """The sweep and training hyperparameters (from the binaries' flags)."""
  widths: tuple[int, ...]
  alphas: tuple[int, ...]
  arms: tuple[str, ...]
  dense_ratios: tuple[float, ...]
  seeds: int
  seed: int
  warmup_steps: int
  steps: int
  chunk_steps: int
  batch_size: int
  optimizer: str
  learning_rate: float
  bias: str
  budget: str
  eval_batch: int = 2048


# --------------------------------------------------------------------------- models


def split_params(tree: dict) -> tuple[dict, dict]:
  """(backbone, head): the head is the `dense_i` entries."""
  head = {k: v for k, v in tree.items() if k.startswith("dense_")}
  return {k: v for k, v in tree.items() if k not in head}, head


def make_apply(spec: ModelSpec) -> Callable:
  """`apply(params, masks, x) -> logits` of a (backbone +) masked MLP head."""

  def apply(params, masks, x):
    backbone, head = split_params(params)
    _, head_masks = split_params(masks)
    if spec.backbone is not None:
      # Backbone masks are all ones (never expanded): the backbone is applied unmasked.
      x = spec.backbone(backbone, x)
    return nn.apply_mlp(head, head_masks, x)

  return apply


def init_model(spec: ModelSpec, key: jax.Array, width: int) -> tuple[dict, dict]:
  """Dense params and all-ones masks of width `width`."""
  head_key, backbone_key = jax.random.split(key)
  params = nn.init_mlp(head_key, spec.head_sizes(width))
  if spec.init_backbone is not None:
    params = {**spec.init_backbone(backbone_key), **params}
  return params, nn.full_masks(params)


def dense_param_count(spec: ModelSpec, width: int) -> int:
  """Parameters (= non-zeros) of the dense model of head width `width`."""
  shapes = jax.eval_shape(lambda k: init_model(spec, k, width)[0], jax.random.key(0))
  return int(sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)))


def width_for_ratio(spec: ModelSpec, width: int, ratio: float) -> int:
  """The head width (> width) whose dense count is nearest `ratio` x width's count."""
  target = ratio * dense_param_count(spec, width)
  best, candidate = width + 1, width + 1
  while True:
    count = dense_param_count(spec, candidate)
    if abs(count - target) < abs(dense_param_count(spec, best) - target):
      best = candidate
    if count >= target:
      return best
    candidate += 1


# ------------------------------------------------------------------------- training


def make_dropconnect_chunk(apply_fn, loss_fn, optimizer, *, batch_size: int, steps: int,
                           layers: Sequence[str], batch_sharding=None):
  """Like `train.make_train_chunk`, with inverted DropConnect on `layers`' weights.

  `chunk(state, x, y, key, keep)`: at step t the weights of each layer in `layers` are
  multiplied by Bernoulli(keep) / keep draws from `fold_in(fold_in(key, t), 1)` (the
  minibatch uses `fold_in(key, t)`, as in train.make_train_chunk). keep=1 is plain training.
  """

  def loss_of(params, masks, xb, yb):
    return loss_fn(apply_fn(params, masks, xb), yb)

  def one_step(state, x, y, key, keep):
    step_key = jax.random.fold_in(key, state.step)
    idx = jax.random.randint(step_key, (batch_size,), 0, x.shape[0])
    xb, yb = x[idx], y[idx]
    if batch_sharding is not None:
      xb = jax.lax.with_sharding_constraint(xb, batch_sharding)
    drop_keys = jax.random.split(jax.random.fold_in(step_key, 1), len(layers))
    masks = dict(state.masks)
    for name, k in zip(layers, drop_keys, strict=True):
      w_mask = masks[name]["w"]
      kept = jax.random.bernoulli(k, keep, w_mask.shape).astype(w_mask.dtype)
      masks[name] = {**masks[name], "w": w_mask * kept / keep}
    loss, grads = jax.value_and_grad(loss_of)(state.params, masks, xb, yb)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = nn.apply_masks(optax.apply_updates(state.params, updates), state.masks)
    return train.TrainState(params, state.masks, opt_state, state.step + 1), loss

  def chunk(state, x, y, key, keep):
    state, losses = jax.lax.scan(lambda s, _: one_step(s, x, y, key, keep), state, None,
                                 length=steps)
    return state, jnp.mean(losses)

  return chunk


def stack_trees(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack_tree(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


class Runner:
  """Trains and evaluates every arm of every width of one task, with checkpoints."""

  def __init__(self, task: str, spec: ModelSpec, data: TaskData, settings: Settings,
               run_dir: common.RunDir, progress: common.Progress):
    self.task, self.spec, self.data, self.s = task, spec, data, settings
    self.run_dir, self.progress = run_dir, progress
    self.apply_fn = make_apply(spec)
    self.optimizer = train.make_optimizer(settings.optimizer, settings.learning_rate)
    self.x_train = jnp.asarray(data.x_train)
    self.y_train = jnp.asarray(data.y_train)
    devices = len(jax.devices())
    batch_sharding = None
    if devices > 1:
      batch_sharding = sharding.batch_sharding(sharding.make_mesh(), data.x_train.ndim)
    common_args = dict(batch_size=settings.batch_size, steps=settings.chunk_steps,
                       batch_sharding=batch_sharding)
    plain = train.make_train_chunk(self.apply_fn, train.softmax_ce, self.optimizer,
                                   **common_args)
    self.plain_chunk = jax.jit(jax.vmap(plain, in_axes=(0, None, None, 0)), donate_argnums=0)
    drop = make_dropconnect_chunk(
        self.apply_fn, train.softmax_ce, self.optimizer,
        layers=[nn.layer_name(i) for i in spec.expand_layers], **common_args)
    self.drop_chunk = jax.jit(jax.vmap(drop, in_axes=(0, None, None, 0, 0)),
                              donate_argnums=0)

  def run_key(self, seed: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(self.s.seed), seed)

  def phases(self) -> int:
    """Steps this task trains in all (for the progress line)."""
    s = self.s
    alphas = len(s.alphas)
    fpe_arms = [a for a in s.arms if a in FPE_SPLITS]
    per_width = (s.warmup_steps + ("dense" in s.arms) * s.steps
                 + bool(fpe_arms) * alphas * s.steps
                 + ("dropconnect" in s.arms) * s.steps
                 + len(s.dense_ratios) * (s.warmup_steps + s.steps))
    return per_width * len(s.widths)

  def train(self, phase: str, state, keys, end_step: int, keep=None):
    """Trains a run-stacked state to `end_step`, resuming from its checkpoints."""
    s = self.s
    phase = f"{self.task}_{phase}"
    first = int(state.step[0])
    store, state, start = self.run_dir.resume(phase, state, first_step=first)
    self.progress.done += start - first
    state = jax.tree.map(jnp.copy, state)  # the chunks donate their input
    t0 = time.perf_counter()
    for step in range(start + s.chunk_steps, end_step + 1, s.chunk_steps):
      if keep is None:
        state, loss = self.plain_chunk(state, self.x_train, self.y_train, keys)
      else:
        state, loss = self.drop_chunk(state, self.x_train, self.y_train, keys, keep)
      loss = np.asarray(loss)
      self.progress.done += s.chunk_steps
      self.run_dir.log({"phase": phase, "step": step, "runs": int(loss.shape[0]),
                        "loss_mean": float(loss.mean()), "loss_max": float(loss.max()),
                        "seconds": round(time.perf_counter() - t0, 3)})
      store.save(step, state)
      self.progress.update(self.progress.done, f"[{phase} loss {loss.mean():.4f}]")
    store.close()
    return state

  def init_states(self, params, masks, step: int = 0):
    states = [train.init_state(p, m, self.optimizer) for p, m in zip(params, masks,
                                                                       strict=True)]
    return stack_trees(states)._replace(step=jnp.full((len(states),), step, jnp.int32))

  def run_width(self, width: int) -> list[dict]:
    """All arms of one base width; one evaluation record per run."""
    s, spec = self.s, self.spec
    seeds = list(range(s.seeds))
    keys = jnp.stack([jax.random.fold_in(self.run_key(i), 4) for i in seeds])
    models = [init_model(spec, jax.random.fold_in(jax.random.fold_in(self.run_key(i), 3),
                                                  width), width) for i in seeds]
    warm = self.init_states([p for p, _ in models], [m for _, m in models])
    if s.warmup_steps:
      warm = self.train(f"h{width}_warmup", warm, keys, s.warmup_steps)
    total = s.warmup_steps + s.steps
    records = []
    if "dense" in s.arms:
      dense = self.train(f"h{width}_dense", warm, keys, total)
      records += self.evaluate(dense, seeds, width, arm="dense", alpha=1)
    if "dropconnect" in s.arms:
      runs = [(a, i) for a in s.alphas for i in seeds]
      state = stack_trees([unstack_tree(warm, i) for _, i in runs])
      keep = jnp.asarray([1.0 / a for a, _ in runs], jnp.float32)
      state = self.train(f"h{width}_dropconnect", state,
                         jnp.stack([keys[i] for _, i in runs]), total, keep=keep)
      for alpha in s.alphas:
        idx = [j for j, (a, _) in enumerate(runs) if a == alpha]
        records += self.evaluate(_select(state, idx), seeds, width, arm="dropconnect",
                                 alpha=alpha)
    splits = [a for a in s.arms if a in FPE_SPLITS]
    for alpha in s.alphas if splits else ():
      runs = [(split, i) for split in splits for i in seeds]
      expanded = [self.expand(unstack_tree(warm, i), split, alpha, i) for split, i in runs]
      state = self.init_states([p for p, _ in expanded], [m for _, m in expanded],
                               step=s.warmup_steps)
      state = self.train(f"h{width}_alpha{alpha}", state,
                         jnp.stack([keys[i] for _, i in runs]), total)
      for split in splits:
        idx = [j for j, (sp, _) in enumerate(runs) if sp == split]
        records += self.evaluate(_select(state, idx), seeds, width, arm=split, alpha=alpha)
    for ratio in s.dense_ratios:
      big = width_for_ratio(spec, width, ratio)
      models = [init_model(spec, jax.random.fold_in(jax.random.fold_in(self.run_key(i), 3),
                                                    big), big) for i in seeds]
      state = self.init_states([p for p, _ in models], [m for _, m in models])
      state = self.train(f"h{width}_dense{ratio:g}x", state, keys, total)
      records += self.evaluate(state, seeds, width, arm=f"dense_x{ratio:g}", alpha=1,
                               head_width=big)
    return records

  def expand(self, state, split: str, alpha: int, seed: int):
    backbone, head = split_params(state.params)
    backbone_masks, head_masks = split_params(state.masks)
    head, head_masks = fpe.expand(
        head, head_masks, layer=list(self.spec.expand_layers), alpha=alpha, split=split,
        key=jax.random.fold_in(self.run_key(seed), 5), bias=self.s.bias, budget=self.s.budget)
    params, masks = {**backbone, **head}, {**backbone_masks, **head_masks}
    assert nn.count_nonzero(params, masks) == nn.count_nonzero(state.params, state.masks)
    return params, masks

  def evaluate(self, state, seeds, width: int, *, arm: str, alpha: int,
               head_width: int | None = None) -> list[dict]:
    """Test accuracy, non-zeros and interference metrics of each run of a stacked state."""
    accuracy_fn = jax.jit(lambda p, m, x: train.predictions(self.apply_fn(p, m, x)))
    records = []
    for i, seed in enumerate(seeds):
      params, masks = unstack_tree(state.params, i), unstack_tree(state.masks, i)
      correct = 0
      for begin in range(0, len(self.data.y_test), self.s.eval_batch):
        xb = self.data.x_test[begin:begin + self.s.eval_batch]
        yb = self.data.y_test[begin:begin + self.s.eval_batch]
        correct += int(np.sum(np.asarray(accuracy_fn(params, masks, xb)) == yb))
      _, head = split_params(params)
      _, head_masks = split_params(masks)
      capacity, abs_cosine, dead = [], [], 0
      for layer in self.spec.expand_layers:
        w = head[nn.layer_name(layer)]["w"]  # incoming weights [d_in, neurons]
        capacity.append(float(jnp.mean(metrics.feature_capacity(w))))
        abs_cosine.append(float(metrics.mean_pairwise_cosine(w, absolute=True)))
        # Neurons left with no incoming edge by the budget prune: a sign the prune ate
        # a whole layer (see --budget).
        incoming = np.asarray(nn.dense_mask(head_masks[nn.layer_name(layer)]["w"]))
        dead += int(np.sum(incoming.sum(axis=0) == 0))
      records.append({
          "task": self.task, "width": width, "arm": arm, "alpha": alpha, "seed": seed,
          "head_width": head_width or width * (1 if arm in ("dense", "dropconnect") else alpha),
          "accuracy": correct / len(self.data.y_test),
          "nonzero": nn.count_nonzero(params, masks),
          # The first expanded layer's figures are the headline ones; all layers are kept.
          "capacity": capacity[0], "abs_cosine": abs_cosine[0],
          "capacity_per_layer": capacity, "abs_cosine_per_layer": abs_cosine,
          "unconnected_neurons": dead,
      })
    return records


def _select(state, idx):
  return jax.tree.map(lambda a: a[np.asarray(idx)], state)


# ------------------------------------------------------------------------ summaries


def _stats(values):
  values = np.asarray(values, np.float64)
  return {"mean": float(values.mean()), "std": float(values.std()),
          "per_seed": [float(v) for v in values]}


def equivalent_dense_size(accuracy: float, family: Sequence[tuple[int, float]],
                          base: int) -> dict:
  """Where `accuracy` falls on a dense family [(non-zeros, mean accuracy)], as a ratio.

  Linear interpolation in log(non-zeros) between the family's envelope points (each beats
  all smaller models); outside the envelope its end ratio is a bound ("<=" or ">=").
  """
  # The envelope: only models that beat every smaller one (a larger dense model that does
  # worse than a smaller one says nothing about the size that accuracy needs).
  envelope = []
  for n, a in sorted(family):
    if not envelope or a > envelope[-1][1]:
      envelope.append((n, a))
  sizes = np.log([n / base for n, _ in envelope])
  best = np.asarray([a for _, a in envelope])
  if accuracy <= best[0]:
    return {"ratio": float(np.exp(sizes[0])), "bound": "<="}
  if accuracy > best[-1]:
    return {"ratio": float(np.exp(sizes[-1])), "bound": ">="}
  j = int(np.flatnonzero(best >= accuracy)[0])
  t = (accuracy - best[j - 1]) / (best[j] - best[j - 1])
  return {"ratio": float(np.exp(sizes[j - 1] + t * (sizes[j] - sizes[j - 1]))), "bound": "="}


def summarize(records: list[dict]) -> list[dict]:
  """Mean ± std over seeds per (task, width, arm, alpha), gains over dense, dense size."""
  groups = {}
  for r in records:
    groups.setdefault((r["task"], r["width"], r["arm"], r["alpha"]), []).append(r)
  dense = {(t, w): {r["seed"]: r for r in rs}
           for (t, w, arm, _), rs in groups.items() if arm == "dense"}
  points = []
  for (task, width, arm, alpha), rs in sorted(groups.items()):
    rs = sorted(rs, key=lambda r: r["seed"])
    point = {"task": task, "width": width, "arm": arm, "alpha": alpha,
             "head_width": rs[0]["head_width"], "nonzero": rs[0]["nonzero"],
             "seeds": [r["seed"] for r in rs]}
    for key in ("accuracy", "capacity", "abs_cosine", "unconnected_neurons"):
      point[key] = _stats([r[key] for r in rs])
    base = dense.get((task, width))
    if arm != "dense" and base and all(r["seed"] in base for r in rs):
      point["accuracy_gain"] = _stats([r["accuracy"] - base[r["seed"]]["accuracy"] for r in rs])
      point["capacity_fold"] = _stats([r["capacity"] / base[r["seed"]]["capacity"] for r in rs])
      point["abs_cosine_fold"] = _stats(
          [r["abs_cosine"] / base[r["seed"]]["abs_cosine"] for r in rs])
    points.append(point)
  for task, width in dense:
    family = [(p["nonzero"], p["accuracy"]["mean"]) for p in points
              if p["task"] == task and p["width"] == width
              and (p["arm"] == "dense" or p["arm"].startswith("dense_x"))]
    base_count = next(p["nonzero"] for p in points
                      if p["task"] == task and p["width"] == width and p["arm"] == "dense")
    if len(family) < 2:
      continue
    for p in points:
      if p["task"] == task and p["width"] == width and not p["arm"].startswith("dense"):
        p["equivalent_dense_size"] = equivalent_dense_size(p["accuracy"]["mean"], family,
                                                           base_count)
  return points


def claims(points: list[dict]) -> dict:
  """The paper's claims, checked on the grid that was run (per task)."""
  out = {}
  for task in sorted({p["task"] for p in points}):
    fpe_points = [p for p in points if p["task"] == task and p["arm"] in FPE_SPLITS
                  and "accuracy_gain" in p]
    if not fpe_points:
      continue
    out[f"{task}_random_beats_dense_everywhere"] = all(
        p["accuracy_gain"]["mean"] > 0 for p in fpe_points if p["arm"] == "random")
    out[f"{task}_fpe_beats_dense_points"] = (
        f"{sum(p['accuracy_gain']['mean'] > 0 for p in fpe_points)}/{len(fpe_points)}")
    drop = {(p["width"], p["alpha"]): p["accuracy"]["mean"] for p in points
            if p["task"] == task and p["arm"] == "dropconnect"}
    pairs = [(p["accuracy"]["mean"], drop[(p["width"], p["alpha"])]) for p in fpe_points
             if p["arm"] == "random" and (p["width"], p["alpha"]) in drop]
    if pairs:
      out[f"{task}_random_ge_dropconnect"] = f"{sum(a >= b for a, b in pairs)}/{len(pairs)}"
    overlap = {(p["width"], p["alpha"]): p["accuracy"]["mean"] for p in fpe_points
               if p["arm"] == "overlap"}
    pairs = [(p["accuracy"]["mean"], overlap[(p["width"], p["alpha"])]) for p in fpe_points
             if p["arm"] == "random" and (p["width"], p["alpha"]) in overlap]
    if pairs:
      out[f"{task}_random_gt_overlap"] = f"{sum(a > b for a, b in pairs)}/{len(pairs)}"
    out[f"{task}_capacity_up"] = all(p["capacity_fold"]["mean"] > 1 for p in fpe_points)
    out[f"{task}_abs_cosine_down"] = all(p["abs_cosine_fold"]["mean"] < 1 for p in fpe_points)
  return out


def table(points: list[dict]) -> str:
  """A plain-text table: accuracy mean ± std, gain, equivalent dense size, metrics."""
  lines = [f"{'task':10s} {'width':>5s} {'arm':12s} {'alpha':>5s} {'nonzero':>8s} "
           f"{'accuracy %':>14s} {'gain':>7s} {'dense size':>10s} {'capacity':>8s} "
           f"{'|cos|':>6s} {'unconn':>6s}"]
  for p in points:
    gain = p.get("accuracy_gain")
    size = p.get("equivalent_dense_size")
    size_text = (f"{'' if size['bound'] == '=' else size['bound']}{size['ratio']:.2f}x"
                 if size else "")
    lines.append(
        f"{p['task']:10s} {p['width']:5d} {p['arm']:12s} {p['alpha']:5d} {p['nonzero']:8d} "
        f"{100 * p['accuracy']['mean']:6.2f} ± {100 * p['accuracy']['std']:5.2f} "
        + (f"{100 * gain['mean']:+7.2f}" if gain else f"{'':7s}")
        + f" {size_text:>10s} {p['capacity']['mean']:8.4f} {p['abs_cosine']['mean']:6.3f}"
        f" {p['unconnected_neurons']['mean']:6.1f}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------- plots


@functools.cache
def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def write_plots(points: list[dict], folder: str) -> list[str]:
  """Accuracy vs width (a panel per task and alpha) and equivalent dense size vs width."""
  plt = _pyplot()
  os.makedirs(folder, exist_ok=True)
  paths = []
  for task in sorted({p["task"] for p in points}):
    rows = [p for p in points if p["task"] == task]
    alphas = sorted({p["alpha"] for p in rows if p["alpha"] > 1}) or [1]
    fig, axes = plt.subplots(1, len(alphas), figsize=(4.6 * len(alphas), 3.8), squeeze=False,
                             sharey=True)
    for ax, alpha in zip(axes[0], alphas, strict=True):
      arms = sorted({p["arm"] for p in rows if p["alpha"] in (1, alpha)},
                    key=lambda a: (not a.startswith("dense"), a))
      for arm in arms:
        sel = sorted((p for p in rows if p["arm"] == arm and p["alpha"] in (1, alpha)),
                     key=lambda p: p["width"])
        ax.errorbar([p["width"] for p in sel], [100 * p["accuracy"]["mean"] for p in sel],
                    yerr=[100 * p["accuracy"]["std"] for p in sel], marker="o", capsize=3,
                    label=arm, linestyle="--" if arm.startswith("dense") else "-")
      ax.set_xscale("log", base=2)
      ax.set_title(f"{task}, alpha = {alpha}")
      ax.set_xlabel("width (neurons before expansion)")
      ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(folder, f"{task}_accuracy_vs_width.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    sized = [p for p in rows if "equivalent_dense_size" in p]
    if sized:
      fig, ax = plt.subplots(figsize=(5.2, 3.8))
      for arm, alpha in sorted({(p["arm"], p["alpha"]) for p in sized}):
        sel = sorted((p for p in sized if p["arm"] == arm and p["alpha"] == alpha),
                     key=lambda p: p["width"])
        ax.plot([p["width"] for p in sel], [p["equivalent_dense_size"]["ratio"] for p in sel],
                marker="o", label=f"{arm} α={alpha}")
      ax.axhline(1.0, color="grey", lw=0.8)
      ax.set_xscale("log", base=2)
      ax.set_xlabel("width (neurons before expansion)")
      ax.set_ylabel("equivalent dense size (x non-zeros)")
      ax.set_title(f"{task}: equivalent dense size (bounds clipped)")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
      fig.tight_layout()
      path = os.path.join(folder, f"{task}_equivalent_dense_size.png")
      fig.savefig(path, dpi=110)
      plt.close(fig)
      paths.append(path)
  return paths


class CountingProgress(common.Progress):
  """`common.Progress` that also carries the running count of steps done."""

  def __init__(self, label: str, total: int):
    super().__init__(label, max(total, 1))
    self.done = 0


# ---------------------------------------------------------------------------- flags


def _int_list(values):
  try:
    return [int(v) for v in values]
  except ValueError:
    return None


def _float_list(values):
  try:
    return [float(v) for v in values]
  except ValueError:
    return None


def define_sweep_flags(module_name: str, **defaults) -> None:
  """Defines the sweep flags shared by the FPE binaries, owned by `module_name`.

  They are attributed to the calling binary's module so that `common.resolved_flags`
  writes them into its flags.txt. `defaults` overrides a flag's default by name.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel

  d = {"widths": ["8", "16", "32"], "alphas": ["2", "4"], "arms": list(ARMS),
       "dense_ratios": ["1.2", "2"], "seeds": 3, "seed": 0, "warmup_steps": 500,
       "steps": 5000, "chunk_steps": 500, "batch_size": 128, "optimizer": "adam",
       "learning_rate": 1e-3, "bias": "copy", "budget": "global", **defaults}
  m = {"module_name": module_name}
  flags.DEFINE_list("widths", d["widths"], "Widths (neurons per hidden layer) before "
                    "expansion; each must be >= every alpha.", **m)
  flags.DEFINE_list("alphas", d["alphas"], "Expansion factors (children per neuron), "
                    "integers >= 2.", **m)
  flags.DEFINE_list("arms", d["arms"], f"Arms among {', '.join(ARMS)}.", **m)
  flags.DEFINE_list("dense_ratios", d["dense_ratios"], "Larger dense models, as multiples "
                    "(> 1) of dense width's non-zeros, for the equivalent dense size.", **m)
  flags.DEFINE_integer("seeds", d["seeds"], "Seeds per point (init, minibatches, splits).",
                       **m)
  flags.DEFINE_integer("seed", d["seed"], "Base seed; every model key derives from it.", **m)
  flags.DEFINE_integer("warmup_steps", d["warmup_steps"], "Dense steps before expansion.", **m)
  flags.DEFINE_integer("steps", d["steps"], "Steps after expansion (every arm).", **m)
  flags.DEFINE_integer("chunk_steps", d["chunk_steps"],
                       "Steps per jitted call: the log and checkpoint period.", **m)
  flags.DEFINE_integer("batch_size", d["batch_size"], "Minibatch size.", **m)
  flags.DEFINE_enum("optimizer", d["optimizer"], train.OPTIMIZERS, "Optimiser.", **m)
  flags.DEFINE_float("learning_rate", d["learning_rate"], "Learning rate.", **m)
  flags.DEFINE_enum("bias", d["bias"], fpe.BIAS_MODES, "Child biases (fpe.expand).", **m)
  flags.DEFINE_enum("budget", d["budget"], fpe.BUDGET_MODES,
                    "Budget-restoring prune over the expanded layers (fpe.expand).", **m)

  common.flag_validator("widths", lambda v: bool(x := _int_list(v)) and min(x) >= 1,
                        "a comma list of integers >= 1, e.g. 8,16,32")
  common.flag_validator("alphas", lambda v: bool(x := _int_list(v)) and min(x) >= 2,
                        "a comma list of integers >= 2 (children per neuron), e.g. 2,4")
  common.flag_validator("arms", lambda v: bool(v) and set(v) <= set(ARMS),
                        f"a comma list of arms among {', '.join(ARMS)}")
  common.flag_validator("dense_ratios", lambda v: (x := _float_list(v)) is not None
                        and all(r > 1 for r in x), "a comma list of numbers > 1, e.g. 1.2,2")
  for name in ("seeds", "steps", "chunk_steps", "batch_size"):
    common.flag_validator(name, lambda v: v >= 1, "must be >= 1")
  common.flag_validator("warmup_steps", lambda v: v >= 0, "must be >= 0")
  common.flag_validator("learning_rate", lambda v: v > 0, "must be > 0")
  flags.register_multi_flags_validator(
      ["widths", "alphas"],
      lambda f: (_int_list(f["widths"]) is None or _int_list(f["alphas"]) is None
                 or min(_int_list(f["widths"])) >= max(_int_list(f["alphas"]))),
      message="--widths: every width must be >= the largest of --alphas (each neuron "
              "splits into alpha children)")
  for steps in ("warmup_steps", "steps"):
    flags.register_multi_flags_validator(
        [steps, "chunk_steps"], lambda f, s=steps: f[s] % f["chunk_steps"] == 0,
        message=f"--{steps}: must be a multiple of --chunk_steps")


def settings_from_flags() -> Settings:
  from absl import flags  # pylint: disable=import-outside-toplevel

  f = flags.FLAGS
  devices = len(jax.devices())
  common.validate("batch_size", f.batch_size % devices == 0,
                  f"must be divisible by the {devices} devices of the data mesh")
  return Settings(
      widths=tuple(sorted(set(_int_list(f.widths)))),
      alphas=tuple(sorted(set(_int_list(f.alphas)))),
      arms=tuple(a for a in ARMS if a in f.arms),
      dense_ratios=tuple(sorted(set(_float_list(f.dense_ratios)))),
      seeds=f.seeds, seed=f.seed, warmup_steps=f.warmup_steps, steps=f.steps,
      chunk_steps=f.chunk_steps, batch_size=f.batch_size, optimizer=f.optimizer,
      learning_rate=f.learning_rate, bias=f.bias, budget=f.budget)


def run_all(experiment: str, module_name: str, tasks: dict, settings: Settings) -> dict:
  """Opens the run directory, runs every task's sweep, writes results.json and plots.

  Args:
    experiment: the binary's name (run directory folder).
    module_name: the binary's module (for flags.txt).
    tasks: task name -> (ModelSpec, TaskData, extra info dict), all loaded already (so a
      missing data set fails before anything is written).
    settings: the sweep.

  Returns:
    The results dict (as written).
  """
  run_dir = common.RunDir(experiment, module_name).open()
  print(f"run directory {run_dir.path}" + (" (resuming)" if run_dir.resumed else ""),
        flush=True)
  t0 = time.perf_counter()
  runners = {name: (Runner(name, spec, data, settings, run_dir, None), info)
             for name, (spec, data, info) in tasks.items()}
  progress = CountingProgress(experiment, sum(r.phases() for r, _ in runners.values()))
  records = []
  for runner, _ in runners.values():
    runner.progress = progress
    for width in settings.widths:
      records += runner.run_width(width)
  points = summarize(records)
  results = {"experiment": experiment, "flags": run_dir.flags_text.splitlines(),
             "devices": len(jax.devices()),
             "tasks": {name: info for name, (_, info) in runners.items()},
             "points": points, "claims": claims(points),
             "seconds": round(time.perf_counter() - t0, 1)}
  print(table(points))
  print("claims:", results["claims"])
  results["plots"] = [os.path.basename(p) for p in write_plots(points, run_dir.plots)]
  path = run_dir.write_results(results)
  print(f"results: {path} ({results['seconds']:.0f} s)")
  return results
