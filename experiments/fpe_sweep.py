"""The one FPE sweep: warm-up, dense, expand, vmapped training, evaluation, summaries.

Run by `experiments.boolean` (MLPs on Boolean DNF tasks), `experiments.embeddings` (MLP
heads on frozen MiniLM embeddings) and `experiments.deep` (a deep MLP and a CNN on
Fashion-MNIST). Not a binary: a binary defines its task (`Task`: model, data, runs) and
its flags (`define_sweep_flags` / `define_training_flags`), turns them into a
`SweepConfig` and reports its own claims; everything between is here.

A model is a two-level params dict: an MLP head `dense_0 .. dense_L` (`fpe_jax.nn`
layout) plus, for the CNN, trainable backbone entries (`conv1`, `conv2`); its mask tree
mirrors it (backbone masks all ones). `fpe.expand` sees the head only.

Arms, for each base width h (every arm has exactly the non-zero count of dense width h,
except the larger dense models that measure the "equivalent dense size"):
- dense: width h, --warmup_steps then --steps more (the optimiser state carries on).
- FPE splits (random / clause / feature / overlap / block), for each alpha: the warmed-up
  dense model expanded (`fpe.expand` over `ModelSpec.expand_layers` under one budget), then
  --steps with a fresh optimiser whose learning-rate schedule continues from the
  warm-up's step (`make_optimizer`). The minibatch sequence continues from the warm-up, so
  every arm of a run sees the same minibatches and learning rates as the dense baseline.
- dropconnect, for each alpha: the warmed-up dense model trained --steps more with a
  fresh Bernoulli mask each step on the expanded layers' incoming weights, each weight
  kept with probability 1/alpha (the share of a parent's inputs one FPE child keeps) and
  scaled by alpha (inverted DropConnect, `train.dropconnect_loss`); all weights at test
  time. This is our reading of the paper's "DropConnect at the same budget": the very
  same non-zero parameters as dense, regularised by random sparsity instead of FPE's
  fixed split (the optimiser state carries on from the warm-up, as for dense).
- dense x r for r in --dense_ratios: the dense model whose head width gives the non-zero
  count nearest r times dense width h's, trained from scratch for warm-up + steps (as two
  phases, like dense: a warm-up below one chunk is one short chunk).
All runs of a task (seeds; for Boolean every clause count x seed) that train the same
phase are stacked on a leading run axis and trained by one jitted, vmapped
`train.make_train_chunk` program, through the checkpointed `common.train_phase`.
With `SweepConfig.matmul` resolving to the Pallas kernel, the FPE phases multiply through
block-sparse kernel masks built once per phase (`kernel_masks`) and passed to the loss as
an argument; the state and its checkpoints keep the plain 0/1 masks.

PRNG streams, by name (every key derives from --seed with `fold_in`):
- run key: `Run.key`, set by the binary: `fold_in(key(seed), s)` for seed s on real data,
  `fold_in(fold_in(key(seed), s), clauses)` for Boolean, whose run key also draws the
  formula (`fold_in(run, 0)`), the training set (1) and the test set (2);
- init: `fold_in(fold_in(run, 3), w)` for a model of head width w (the dense x r models
  too, at their own width); real-data models split it into (head, backbone) keys
  (`ModelSpec.split_init_key`), Boolean's MLP uses it as is;
- training: `fold_in(run, 4)`, the same for every phase and arm of the run: minibatch t
  is `train.step_key(training, t)`, DropConnect draws from `fold_in(step_key, 1)`;
- split: `fold_in(run, 5)` for `fpe.expand` (which folds in each expanded layer's rank).

Equivalent dense size of an arm: where its mean accuracy falls on the dense family of
its width (1x, then each ratio), by linear interpolation in log(non-zeros) between the
family's envelope points (each more accurate than every smaller model); at or below the
first or above the best it is reported as a bound ("<=" / ">=").
"""

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import common, optimizer_flags
from fpe_jax import ensemble, fpe, metrics, nn, sharding, train
from kernels_pallas import implementations
from kernels_pallas.block_sparse import BlockSparseMask

# The DEFINEs of `define_training_flags` / `define_sweep_flags` are attributed to the binary
# that calls them, not to this module: absl skips disclaimed modules when it looks for a
# flag's owner, so the binary's flags.txt (common.resolved_flags) lists them.
flags.disclaim_key_flags()

REAL_DATA_SPLITS = ("random", "feature", "overlap", "block")
ARMS = ("dense",) + REAL_DATA_SPLITS + ("dropconnect",)  # the real-data binaries' arms
# --arms' default: every arm but `block` (added later; a default that grew would make runs
# started before it refuse to resume, their flags.txt listing the old default).
DEFAULT_ARMS = tuple(arm for arm in ARMS if arm != "block")


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """The sweep's grid and training recipe (a binary's flags, read once).

  Attributes:
    widths: base widths h (neurons per expanded hidden layer before expansion).
    alphas: expansion factors (children per neuron), each >= 2.
    arms: "dense", FPE splits (`fpe.SPLITS`), "dropconnect", in that order.
    dense_ratios: larger dense models, as multiples (> 1) of dense width h's non-zeros.
    seeds: runs per sweep point.
    seed: the base seed.
    warmup_steps: dense steps before the expansion: below chunk_steps (one short chunk)
      or a multiple of it.
    steps: steps after it (every arm), a multiple of chunk_steps.
    chunk_steps: steps per jitted call: the log and checkpoint period.
    batch_size: examples per step.
    optimizer: one of `train.OPTIMIZERS`.
    learning_rate: the initial learning rate.
    weight_decay: L2 (adam, sgd) or decoupled (adamw) weight decay; 0: none.
    schedule: one of `train.SCHEDULES`, a function of the global step: the FPE arms'
      fresh optimiser after the expansion runs it offset by warmup_steps
      (`make_optimizer(cfg, first_step=warmup_steps)`), so every arm trains at dense's
      rate at the same step; cosine decays over warm-up + steps.
    schedule_boundaries: the "step" schedule's boundaries.
    schedule_decay: the "step" schedule's factor.
    bias: child biases (`fpe.BIAS_MODES`).
    budget: budget-restoring prune (`fpe.BUDGET_MODES`).
    matmul: the FPE arms' masked matmuls, one of kernels_pallas.implementations'
      IMPLEMENTATIONS: "xla" (w * mask), "pallas" (the block-sparse kernel), "auto"
      (the kernel on TPU / GPU); see `kernel_masks`.
    eval_batch: test examples per evaluation call.
  """
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
  weight_decay: float
  schedule: str
  schedule_boundaries: tuple[int, ...]
  schedule_decay: float
  bias: str
  budget: str
  matmul: str = "xla"
  eval_batch: int = 2048

  @property
  def fpe_splits(self) -> tuple[str, ...]:
    return tuple(a for a in self.arms if a in fpe.SPLITS)


def make_optimizer(cfg: SweepConfig, first_step: int = 0):
  """The sweep's optax optimiser for a fresh optimiser state made at global step `first_step`.

  The learning-rate schedule is a function of the global step: optax counts the steps of
  its own state from 0, so a state made at `first_step` (the FPE arms' after the
  expansion, at warmup_steps) runs `schedule(count + first_step)`. A constant rate stays
  the plain float (at the defaults: plain `optax.<optimizer>(lr)`, whatever `first_step`).
  """
  schedule = train.make_schedule(
      cfg.schedule, cfg.learning_rate, total_steps=cfg.warmup_steps + cfg.steps,
      boundaries=cfg.schedule_boundaries, decay_factor=cfg.schedule_decay)
  if callable(schedule) and first_step:
    schedule = functools.partial(_offset_schedule, schedule, first_step)
  return train.make_optimizer(cfg.optimizer, schedule, weight_decay=cfg.weight_decay)


def _offset_schedule(schedule: Callable, offset: int, count):
  return schedule(count + offset)


# --------------------------------------------------------------------------- models


class ModelSpec(NamedTuple):
  """What a task's model is.

  Attributes:
    head_sizes: width -> the head's layer sizes `[d_in, h, ..., h, num_outputs]`.
    expand_layers: hidden layers of the head that FPE expands (one global budget); the
      first one's metrics are the headline ones.
    init_backbone: key -> backbone params `{name: {"w", "b"}}` (None: no backbone).
    backbone: (backbone params, x [n, ...]) -> features [n, head d_in].
    split_init_key: split the init key into (head, backbone) keys (the real-data
      models, with or without a backbone), or init the head with it (Boolean).
  """
  head_sizes: Callable[[int], list[int]]
  expand_layers: tuple[int, ...]
  init_backbone: Callable[[jax.Array], dict] | None = None
  backbone: Callable[[dict, jax.Array], jax.Array] | None = None
  split_init_key: bool = True


def split_params(tree: dict) -> tuple[dict, dict]:
  """(backbone, head): the head is the `dense_i` entries."""
  head = {k: v for k, v in tree.items() if k.startswith("dense_")}
  return {k: v for k, v in tree.items() if k not in head}, head


def make_apply(spec: ModelSpec, implementation: str = "xla") -> train.ApplyFn:
  """`apply(params, masks, x) -> logits` of a (backbone +) masked MLP head.

  `implementation` picks the head's matmuls (`nn.apply_mlp`; "xla": `x @ (w * mask)`).
  """

  def apply(params, masks, x):
    backbone, head = split_params(params)
    _, head_masks = split_params(masks)
    if spec.backbone is not None:
      # Backbone masks are all ones (never expanded): the backbone is applied unmasked.
      x = spec.backbone(backbone, x)
    return nn.apply_mlp(head, head_masks, x, implementation=implementation)

  return apply


def init_model(spec: ModelSpec, key: jax.Array, width: int) -> tuple[dict, dict]:
  """Dense params and all-ones masks of head width `width`."""
  head_key, backbone_key = jax.random.split(key) if spec.split_init_key else (key, None)
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
  # The count grows with the width: bisect for the first width reaching the target, then
  # take it or the one below, whichever is nearer (the smaller on a tie).
  low, high = width + 1, width + 1
  while dense_param_count(spec, high) < target:
    low, high = high + 1, 2 * high
  while low < high:
    middle = (low + high) // 2
    low, high = (middle + 1, high) if dense_param_count(spec, middle) < target else (low, middle)
  below = high - 1
  if below > width and (abs(dense_param_count(spec, below) - target)
                        <= abs(dense_param_count(spec, high) - target)):
    return below
  return high


# ---------------------------------------------------------------------------- tasks


class TaskData(NamedTuple):
  """Train and test arrays of one task: shared by its runs, or one set per run.

  Shared: `x_train: [n, ...]`, `y_train: [n]` (numpy; the same for the test arrays).
  Per run (`Task.per_run_data`): a leading run axis, `x_train: [R, n, ...]`, `y_train:
  [R, n]`, in the order of `Task.runs`.
  """
  x_train: Any
  y_train: Any
  x_test: Any
  y_test: Any
  num_classes: int


class Run(NamedTuple):
  """One run of a task: its key and what names it in the records.

  Attributes:
    key: the run key (module docstring: PRNG streams).
    labels: record fields that name the run, e.g. `{"task": "mlp", "seed": 0}` or
      `{"clauses": 8, "seed": 0}`; "seed" pairs its arms with its dense baseline.
    expand_args: extra `fpe.expand` arguments (Boolean: the formula's clauses).
    extra_metrics: `(params, masks) -> {name: value}` evaluated per trained model, or None.
  """
  key: jax.Array
  labels: Mapping[str, Any]
  expand_args: Mapping[str, Any] = {}
  extra_metrics: Callable[[dict, dict], dict] | None = None


class Task(NamedTuple):
  """A family of runs trained together: one model spec, its data and its runs.

  Attributes:
    name: prefixes its phases (`<name>_h8_warmup`; "" for none).
    spec: the model.
    data: the data (`TaskData`).
    runs: the runs; each phase vmaps all of them (times its arms).
    objective: `(logits, labels) -> scalar` (`train.softmax_ce`, `train.sigmoid_bce`).
    per_run_data: whether `data` has a leading run axis.
  """
  name: str
  spec: ModelSpec
  data: TaskData
  runs: tuple[Run, ...]
  objective: train.Objective = train.softmax_ce
  per_run_data: bool = False


def planned_steps(cfg: SweepConfig) -> int:
  """Steps one task trains in all (for the progress line)."""
  per_width = (cfg.warmup_steps + ("dense" in cfg.arms) * cfg.steps
               + bool(cfg.fpe_splits) * len(cfg.alphas) * cfg.steps
               + ("dropconnect" in cfg.arms) * cfg.steps
               + len(cfg.dense_ratios) * (cfg.warmup_steps + cfg.steps))
  return per_width * len(cfg.widths)


# ----------------------------------------------------------------------- --matmul


def kernel_masks(masks: nn.Masks, matmul: str) -> nn.Masks | None:
  """The FPE phase's block-sparse kernel masks, or None where `matmul` runs XLA here.

  The one place of the sweep that builds kernel metadata (host-side, once per phase, from
  the run-stacked head weight masks `[R, d_in, d_out]`): where `matmul` resolves to the
  Pallas kernel (kernels_pallas.implementations: "pallas", or "auto" on TPU / GPU). The
  state keeps its plain 0/1 masks (re-applied after each update, checkpointed); these only
  route the matmuls, as the "kernel" loss's argument (`Sweep.losses`).
  """
  if implementations.resolve_implementation(matmul) != "pallas":
    return None

  def kernel(name, layer_masks):
    if not name.startswith("dense_"):
      return layer_masks
    return {**layer_masks, "w": BlockSparseMask.from_masks(np.asarray(layer_masks["w"]))}

  return {name: kernel(name, m) for name, m in masks.items()}


def on_kernel_masks(loss_fn: train.LossFn) -> train.LossFn:
  """`loss_fn` on the kernel masks passed as its last argument, not the state's masks."""

  def kernel_loss_fn(params, masks, x, y, step_key, kernel):
    del masks  # the same 0/1 masks, as block metadata
    return loss_fn(params, kernel, x, y, step_key)

  return kernel_loss_fn


# ------------------------------------------------------------------------ the sweep


def select(tree, idx: Sequence[int]):
  """The runs `idx` of a run-stacked tree."""
  return jax.tree.map(lambda a: a[np.asarray(idx)], tree)


class Sweep:
  """Trains and evaluates every arm of every width of one task, with checkpoints."""

  def __init__(self, task: Task, cfg: SweepConfig, run_dir: common.RunDir,
               progress: common.Progress):
    self.task, self.cfg, self.run_dir, self.progress = task, cfg, run_dir, progress
    self.apply_fn = make_apply(task.spec)
    # Optimisers by the step their fresh state is made at: "dense" at 0 (the warm-up, dense
    # x r; dense and DropConnect carry the warm-up's state on), "expanded" at the warm-up's
    # end (the FPE arms), so both follow one schedule of the global step.
    self.optimizers = {"dense": make_optimizer(cfg),
                       "expanded": make_optimizer(cfg, first_step=cfg.warmup_steps)}
    data = task.data
    self.x_train, self.y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    self.predict = jax.jit(lambda p, m, x: train.predictions(self.apply_fn(p, m, x)))
    example_ndim = self.x_train.ndim - 1 - task.per_run_data
    self.mesh = self.batch_sharding = None
    if len(jax.devices()) > 1:
      self.mesh = sharding.make_mesh()
      self.batch_sharding = sharding.batch_sharding(self.mesh, example_ndim + 1)
    self.losses = {
        "plain": train.supervised_loss(self.apply_fn, task.objective),
        "dropconnect": train.dropconnect_loss(
            self.apply_fn, task.objective,
            [nn.layer_name(i) for i in task.spec.expand_layers]),
        "kernel": on_kernel_masks(train.supervised_loss(
            make_apply(task.spec, implementation=cfg.matmul), task.objective)),
    }
    self.programs = {}

  def program(self, loss: str, steps: int, optimizer: str):
    """The jitted chunk of `steps` steps, vmapped over runs (once per loss, size, optimiser)."""
    if (loss, steps, optimizer) not in self.programs:
      chunk = train.make_train_chunk(self.losses[loss], self.optimizers[optimizer],
                                     batch_size=self.cfg.batch_size, steps=steps,
                                     batch_sharding=self.batch_sharding)
      data_axis = 0 if self.task.per_run_data else None
      num_loss_args = 0 if loss == "plain" else 1  # dropconnect: keep; kernel: kernel masks
      in_axes = (0, data_axis, data_axis, 0) + (0,) * num_loss_args
      self.programs[loss, steps, optimizer] = jax.jit(jax.vmap(chunk, in_axes=in_axes),
                                                      donate_argnums=0)
    return self.programs[loss, steps, optimizer]

  def run_phase(self, phase: str, state: train.TrainState, runs: Sequence[int],
                end_step: int, loss: str = "plain", loss_args=(),
                optimizer: str = "dense") -> train.TrainState:
    """Trains the run-stacked `state` of `runs` (indices into task.runs) to `end_step`.

    `optimizer` names the entry of `self.optimizers` that made the state's optimiser state.
    """
    first = int(state.step[0])
    steps = min(self.cfg.chunk_steps, end_step - first)  # a warm-up may be one short chunk
    x, y = self.x_train, self.y_train
    if self.task.per_run_data:
      x, y = select(x, runs), select(y, runs)
    keys = jnp.stack([self.train_key(r) for r in runs])
    name = f"{self.task.name}_{phase}" if self.task.name else phase
    if self.mesh is not None:
      # Replicated over the mesh, as the chunk's batch constraint needs: checkpoints restore
      # onto the template's devices, and a fresh state is uncommitted (device 0), which
      # once restored would be committed there and clash with the batches over the mesh.
      state = jax.device_put(state, sharding.replicated(self.mesh))
    return common.train_phase(self.run_dir, name, state, self.program(loss, steps, optimizer),
                              x, y, keys, *loss_args, end_step=end_step, chunk_steps=steps,
                              progress=self.progress)

  def train_key(self, r: int) -> jax.Array:
    return jax.random.fold_in(self.task.runs[r].key, 4)

  def init_states(self, models, step: int = 0, optimizer: str = "dense") -> train.TrainState:
    """Fresh optimiser states of (params, masks) models, stacked on the run axis."""
    return ensemble.stack_members([train.init_state(p, self.optimizers[optimizer], m, step=step)
                                   for p, m in models])

  def dense_models(self, width: int):
    spec = self.task.spec
    return [init_model(spec, jax.random.fold_in(jax.random.fold_in(run.key, 3), width), width)
            for run in self.task.runs]

  def run_width(self, width: int) -> list[dict]:
    """All arms of one base width; one evaluation record per run and arm."""
    cfg = self.cfg
    everyone = list(range(len(self.task.runs)))
    warm = self.init_states(self.dense_models(width))
    if cfg.warmup_steps:
      warm = self.run_phase(f"h{width}_warmup", warm, everyone, cfg.warmup_steps)
    total = cfg.warmup_steps + cfg.steps
    records = []
    if "dense" in cfg.arms:
      dense = self.run_phase(f"h{width}_dense", warm, everyone, total)
      records += self.evaluate(dense, everyone, width, arm="dense", alpha=1)
    if "dropconnect" in cfg.arms:
      # The phase's stacked runs, one per (alpha, run index), in this order.
      stacked_runs = [(a, i) for a in cfg.alphas for i in everyone]
      run_indices = [i for _, i in stacked_runs]
      keep = jnp.asarray([1.0 / a for a, _ in stacked_runs], jnp.float32)
      state = self.run_phase(f"h{width}_dropconnect", select(warm, run_indices), run_indices,
                             total, "dropconnect", (keep,))
      for alpha in cfg.alphas:
        rows = [j for j, (a, _) in enumerate(stacked_runs) if a == alpha]
        records += self.evaluate(select(state, rows), everyone, width, arm="dropconnect",
                                 alpha=alpha)
    warm_runs = ensemble.unstack_members(warm) if cfg.fpe_splits else []
    for alpha in cfg.alphas if cfg.fpe_splits else ():
      # The phase's stacked runs, one per (split, run index), in this order.
      stacked_runs = [(split, i) for split in cfg.fpe_splits for i in everyone]
      run_indices = [i for _, i in stacked_runs]
      expanded = [self.expand(warm_runs[i], split, alpha, i) for split, i in stacked_runs]
      state = self.init_states(expanded, step=cfg.warmup_steps, optimizer="expanded")
      kernel = kernel_masks(state.masks, cfg.matmul)
      loss, loss_args = ("plain", ()) if kernel is None else ("kernel", (kernel,))
      state = self.run_phase(f"h{width}_alpha{alpha}", state, run_indices, total, loss,
                             loss_args, optimizer="expanded")
      for split in cfg.fpe_splits:
        rows = [j for j, (sp, _) in enumerate(stacked_runs) if sp == split]
        records += self.evaluate(select(state, rows), everyone, width, arm=split, alpha=alpha)
    for ratio in cfg.dense_ratios:
      big = width_for_ratio(self.task.spec, width, ratio)
      state = self.init_states(self.dense_models(big))
      phase = f"h{width}_dense{common.number_label(ratio)}x"
      if cfg.warmup_steps:  # as dense: a warm-up below one chunk is one short chunk
        state = self.run_phase(f"{phase}_warmup", state, everyone, cfg.warmup_steps)
      state = self.run_phase(phase, state, everyone, total)
      records += self.evaluate(state, everyone, width,
                               arm=f"dense_x{common.number_label(ratio)}", alpha=1,
                               head_width=big)
    return records

  def expand(self, state: train.TrainState, split: str, alpha: int, r: int):
    """The FPE expansion of run r's head (one model, on the host)."""
    backbone, head = split_params(state.params)
    backbone_masks, head_masks = split_params(state.masks)
    run = self.task.runs[r]
    head, head_masks = fpe.expand(
        head, head_masks, layer=list(self.task.spec.expand_layers), alpha=alpha, split=split,
        key=jax.random.fold_in(run.key, 5), bias=self.cfg.bias, budget=self.cfg.budget,
        **run.expand_args)
    params, masks = {**backbone, **head}, {**backbone_masks, **head_masks}
    assert nn.count_nonzero(params, masks) == nn.count_nonzero(state.params, state.masks)
    return params, masks

  def test_data(self, r: int):
    data = self.task.data
    if self.task.per_run_data:
      return data.x_test[r], np.asarray(data.y_test[r])
    return data.x_test, data.y_test

  def accuracy(self, params, masks, x_test, y_test) -> float:
    """Fraction of `x_test: [n, ...]` classified as `y_test: [n]`, in slices of `eval_batch`."""
    batch, correct = self.cfg.eval_batch, 0
    for begin in range(0, len(y_test), batch):
      predicted = np.asarray(self.predict(params, masks, x_test[begin:begin + batch]))
      correct += int(np.sum(predicted == y_test[begin:begin + batch]))
    return correct / len(y_test)

  def evaluate(self, state: train.TrainState, runs: Sequence[int], width: int, *, arm: str,
               alpha: int, head_width: int | None = None) -> list[dict]:
    """Test accuracy, non-zeros and interference metrics of each run of a stacked state."""
    records = []
    models = zip(ensemble.unstack_members(state.params), ensemble.unstack_members(state.masks),
                 strict=True)
    for r, (params, masks) in zip(runs, models, strict=True):
      run = self.task.runs[r]
      records.append({
          **run.labels, "width": width, "arm": arm, "alpha": alpha,
          "head_width": head_width or width * (1 if arm in ("dense", "dropconnect") else alpha),
          "accuracy": self.accuracy(params, masks, *self.test_data(r)),
          "nonzero": nn.count_nonzero(params, masks),
          **layer_metrics(params, masks, self.task.spec.expand_layers),
          **(run.extra_metrics(params, masks) if run.extra_metrics else {}),
      })
    return records


def layer_metrics(params: dict, masks: dict, layers: Sequence[int]) -> dict:
  """Interference metrics of the expanded layers' incoming weights `w: [d_in, neurons]`.

  capacity, abs_cosine and cosine are the first layer's (the headline figures); the
  `*_per_layer` lists hold every layer's. unconnected_neurons counts the neurons the
  budget prune left without an incoming edge (a sign it ate a whole layer, see --budget).
  block_density is the share of 128x128 blocks of the first layer's incoming mask that
  hold a non-zero (what the block-sparse kernel multiplies; 1/alpha for the `block` split
  when the widths are multiples of 128); `block_density_per_layer` holds every layer's.
  """
  _, head = split_params(params)
  _, head_masks = split_params(masks)
  capacity, abs_cosine, density, unconnected = [], [], [], 0
  for layer in layers:
    w = head[nn.layer_name(layer)]["w"]
    capacity.append(float(jnp.mean(metrics.feature_capacity(w))))
    abs_cosine.append(float(metrics.mean_pairwise_cosine(w, absolute=True)))
    incoming = np.asarray(nn.dense_mask(head_masks[nn.layer_name(layer)]["w"]))
    unconnected += int(np.sum(incoming.sum(axis=0) == 0))
    density.append(metrics.block_density(incoming))
  first = head[nn.layer_name(layers[0])]["w"]
  return {"capacity": capacity[0], "abs_cosine": abs_cosine[0],
          "cosine": float(metrics.mean_pairwise_cosine(first)),
          "capacity_per_layer": capacity, "abs_cosine_per_layer": abs_cosine,
          "block_density": density[0], "block_density_per_layer": density,
          "unconnected_neurons": unconnected}


def check_task(task: Task, cfg: SweepConfig) -> None:
  """The checks of the sweep against a task's data and model, before anything is written:
  every neuron FPE splits has a fan-in of at least the largest alpha (each child needs an
  incoming edge), and a minibatch is no larger than the training set (minibatches are
  drawn with replacement, so a larger one would repeat examples in every step)."""
  where = f"task {task.name}: " if task.name else ""
  for width in cfg.widths:
    sizes = task.spec.head_sizes(width)
    fan_in = min(sizes[layer] for layer in task.spec.expand_layers)
    common.validate("alphas", not cfg.fpe_splits or max(cfg.alphas) <= fan_in,
                    f"{where}alpha={max(cfg.alphas)} children need at least one incoming edge "
                    f"each, but the neurons FPE splits at width {width} have {fan_in} inputs")
  examples = task.data.y_train.shape[-1]
  common.validate("batch_size", cfg.batch_size <= examples,
                  f"{where}{cfg.batch_size} is more than the {examples} training examples")


def train_and_evaluate(run_dir: common.RunDir, tasks: Sequence[Task],
                       cfg: SweepConfig) -> list[dict]:
  """Checks the tasks, opens `run_dir` and runs every task's sweep: the records."""
  for task in tasks:
    check_task(task, cfg)
  run_dir.open()
  print(f"run directory {run_dir.path}" + (" (resuming)" if run_dir.resumed else ""),
        flush=True)
  progress = common.Progress(run_dir.experiment, planned_steps(cfg) * len(tasks))
  records = []
  for task in tasks:
    sweep = Sweep(task, cfg, run_dir, progress)
    for width in cfg.widths:
      records += sweep.run_width(width)
  return records


# ------------------------------------------------------------------------ summaries


def stats(values) -> dict:
  """Mean, std and the values of a per-seed list."""
  values = np.asarray(values, np.float64)
  return {"mean": float(values.mean()), "std": float(values.std()),
          "per_seed": [float(v) for v in values]}


def summarize(records: list[dict], *, by: Sequence[str], metrics: Sequence[str],
              constant: Sequence[str] = ("nonzero",), order: Callable | None = None
              ) -> list[dict]:
  """Mean ± std over seeds per point, gains over dense paired by seed, dense size.

  Args:
    records: one per run and arm (`Sweep.evaluate`).
    by: the fields that make a point, among them "arm" and "alpha"; the others name its
      site (e.g. task and width), where the dense baseline and the dense family live.
    metrics: the record fields summarised by `stats` (None values left out; a metric
      with none is left out of the point).
    constant: fields copied from the point's first record (equal over its seeds).
    order: sort key of a point's first record (default: its `by` values).

  Returns:
    The points, sorted. A point at a site with a dense arm gains `accuracy_gain`,
    `capacity_fold` and `abs_cosine_fold` (per seed against the same seed's dense run);
    a non-dense arm at a site with a dense family (dense and dense x r) gains
    `equivalent_dense_size`.
  """
  site_keys = [k for k in by if k not in ("arm", "alpha")]
  site = lambda r: tuple(r[k] for k in site_keys)
  groups = {}
  for r in records:
    groups.setdefault(tuple(r[k] for k in by), []).append(r)
  dense = {site(rs[0]): {r["seed"]: r for r in rs} for rs in groups.values()
           if rs[0]["arm"] == "dense"}
  order = order or (lambda r: tuple(r[k] for k in by))
  points = []
  for rs in sorted(groups.values(), key=lambda rs: order(rs[0])):
    rs = sorted(rs, key=lambda r: r["seed"])
    point = {**{k: rs[0][k] for k in (*by, *constant)}, "seeds": [r["seed"] for r in rs]}
    for key in metrics:
      values = [r[key] for r in rs if r.get(key) is not None]
      if values:
        point[key] = stats(values)
    base = dense.get(site(rs[0]))
    if point["arm"] != "dense" and base and all(r["seed"] in base for r in rs):
      point["accuracy_gain"] = stats([r["accuracy"] - base[r["seed"]]["accuracy"] for r in rs])
      point["capacity_fold"] = stats([r["capacity"] / base[r["seed"]]["capacity"] for r in rs])
      point["abs_cosine_fold"] = stats(
          [r["abs_cosine"] / base[r["seed"]]["abs_cosine"] for r in rs])
    points.append(point)
  for where in dense:
    at = [p for p in points if site(p) == where]
    family = [(p["nonzero"], p["accuracy"]["mean"]) for p in at
              if p["arm"] == "dense" or p["arm"].startswith("dense_x")]
    if len(family) < 2:
      continue
    base_count = next(p["nonzero"] for p in at if p["arm"] == "dense")
    for p in at:
      if not p["arm"].startswith("dense"):
        p["equivalent_dense_size"] = equivalent_dense_size(p["accuracy"]["mean"], family,
                                                           base_count)
  return points


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


# ------------------------------------------------------- real data: claims, table, plots

REAL_DATA_POINT = dict(by=("task", "width", "arm", "alpha"),
                       metrics=("accuracy", "capacity", "abs_cosine", "unconnected_neurons",
                                "block_density"),
                       constant=("head_width", "nonzero"))


def claims(points: list[dict]) -> dict:
  """The paper's real-data claims, checked on the grid that was run (per task)."""
  out = {}
  for task in sorted({p["task"] for p in points}):
    fpe_points = [p for p in points if p["task"] == task and p["arm"] in fpe.SPLITS
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


def real_data_tasks(tasks: Mapping[str, tuple[ModelSpec, TaskData, dict]],
                    cfg: SweepConfig) -> list[Task]:
  """The real-data binaries' tasks: every seed s one run with key fold_in(key(seed), s)."""
  def runs(name):
    return tuple(Run(key=jax.random.fold_in(jax.random.key(cfg.seed), s),
                     labels={"task": name, "seed": s}) for s in range(cfg.seeds))
  return [Task(name, spec, data, runs(name)) for name, (spec, data, _) in tasks.items()]


def real_data_main(experiment: str, module_name: str, config_from_flags: Callable,
                   load_tasks: Callable, argv: Sequence[str]) -> dict:
  """The main of a real-data binary (bind the first four arguments, pass to common.run).

  Args:
    experiment: the binary's name (run directory folder).
    module_name: the binary's module (for flags.txt).
    config_from_flags: () -> the binary's frozen config (into results.json), whose
      `sweep` is the sweep.
    load_tasks: config -> {task name: (ModelSpec, TaskData, info dict)}; it runs before
      the run directory is opened, so missing data fails before anything is written.
    argv: the command line left after the flags (must be empty).

  Returns:
    The results dict (as written to results.json, beside the plots).
  """
  if len(argv) > 1:
    raise common.UsageError(f"unexpected arguments {argv[1:]}; use --flags")
  common.maybe_initialize_distributed()
  config = config_from_flags()
  run_dir = common.RunDir(experiment, module_name).check()  # refuse before the slow setup
  t0 = time.perf_counter()
  tasks = load_tasks(config)
  print(f"data ready in {time.perf_counter() - t0:.0f} s ({len(jax.devices())} devices)",
        flush=True)
  t0 = time.perf_counter()
  records = train_and_evaluate(run_dir, real_data_tasks(tasks, config.sweep), config.sweep)
  points = summarize(records, **REAL_DATA_POINT)
  results = {"experiment": experiment, "flags": run_dir.flags_text.splitlines(),
             "config": common.config_record(config), "devices": len(jax.devices()),
             "tasks": {name: info for name, (_, _, info) in tasks.items()},
             "points": points, "claims": claims(points),
             "seconds": round(time.perf_counter() - t0, 1)}
  print(table(points))
  print("claims:", results["claims"])
  results["plots"] = [os.path.basename(p) for p in write_plots(points, run_dir.plots)]
  path = run_dir.write_results(results)
  print(f"results: {path} ({results['seconds']:.0f} s)")
  return results


# ---------------------------------------------------------------------------- flags


def define_training_flags(**defaults) -> None:
  """Defines the flags of every FPE binary: --alphas, the training recipe and --matmul.

  Call it once, when the binary is imported: this module disclaims its DEFINEs, so absl
  files the flags under the calling binary and `common.resolved_flags` writes them into
  its flags.txt.

  Args:
    **defaults: a flag's default by name, overriding this function's (e.g. `seeds=5`;
      list flags take a list of strings).

  Raises:
    TypeError: if `defaults` names a flag this function does not define.
  """
  d = {"alphas": ["2", "4"], "seeds": 3, "seed": 0, "warmup_steps": 500, "steps": 5000,
       "chunk_steps": 500, "batch_size": 128, **optimizer_flags.DEFAULTS,
       "bias": "copy", "budget": "global", "matmul": "xla"}
  unknown = sorted(set(defaults) - set(d))
  if unknown:
    raise TypeError(f"define_training_flags: no flag named {', '.join(unknown)}; "
                    f"it defines {', '.join(d)}")
  d.update(defaults)
  flags.DEFINE_list("alphas", d["alphas"], "Expansion factors (children per neuron), "
                    "integers >= 2.")
  flags.DEFINE_integer("seeds", d["seeds"], "Seeds per point (init, minibatches, splits).")
  flags.DEFINE_integer("seed", d["seed"], "Base seed; every key derives from it.")
  flags.DEFINE_integer("warmup_steps", d["warmup_steps"], "Dense steps before expansion: "
                       "below --chunk_steps (one short chunk) or a multiple of it.")
  flags.DEFINE_integer("steps", d["steps"], "Steps after expansion (every arm), a multiple "
                       "of --chunk_steps.")
  flags.DEFINE_integer("chunk_steps", d["chunk_steps"],
                       "Steps per jitted call: the log and checkpoint period.")
  flags.DEFINE_integer("batch_size", d["batch_size"], "Minibatch size.")
  optimizer_flags.define(
      "of the global step: the FPE arms' fresh optimiser after the expansion continues it; "
      "cosine decays over --warmup_steps + --steps",
      **{name: d[name] for name in optimizer_flags.DEFAULTS})
  flags.DEFINE_enum("bias", d["bias"], fpe.BIAS_MODES, "Child biases (fpe.expand).")
  flags.DEFINE_enum("budget", d["budget"], fpe.BUDGET_MODES,
                    "Budget-restoring prune over the expanded layers (fpe.expand).")
  flags.DEFINE_enum("matmul", d["matmul"], implementations.IMPLEMENTATIONS,
                    "Masked matmuls of the FPE arms: XLA (w * mask), the block-sparse Pallas "
                    "kernel (kernels_pallas; interpret mode on CPU, for checking only), or "
                    "auto (the kernel on TPU / GPU, XLA on CPU).")

  common.flag_validator("alphas", lambda v: bool(x := common.int_list(v)) and min(x) >= 2,
                        "a comma list of integers >= 2 (children per neuron), e.g. 2,4")
  for name in ("seeds", "steps", "chunk_steps", "batch_size"):
    common.flag_validator(name, lambda v: v >= 1, "must be >= 1")
  common.flag_validator("warmup_steps", lambda v: v >= 0, "must be >= 0")
  common.seed_validator("seed")


# The largest dense model a sweep trains, as a multiple of its smallest: a sanity bound
# (1000 x of a 784-32-10 MLP is 25M parameters), not a scientific one.
MAX_DENSE_RATIO = 1000


def define_sweep_flags(**defaults) -> None:
  """Defines the real-data binaries' flags: the grid and `define_training_flags`' flags.

  Call it once, when the binary is imported (the flags are filed under the binary, see
  `define_training_flags`). `defaults` overrides a flag's default by name.
  """
  grid = {"widths": ["8", "16", "32"], "arms": list(DEFAULT_ARMS),
          "dense_ratios": ["1.2", "2"]}
  grid.update({k: defaults.pop(k) for k in list(defaults) if k in grid})
  flags.DEFINE_list("widths", grid["widths"], "Widths (neurons per hidden layer) before "
                    "expansion; each must be >= every alpha.")
  flags.DEFINE_list("arms", grid["arms"], f"Arms among {', '.join(ARMS)}.")
  flags.DEFINE_list("dense_ratios", grid["dense_ratios"], "Larger dense models, as multiples "
                    "(> 1) of dense width's non-zeros, for the equivalent dense size.")
  define_training_flags(**defaults)

  common.flag_validator("widths", lambda v: bool(x := common.int_list(v)) and min(x) >= 1,
                        "a comma list of integers >= 1, e.g. 8,16,32")
  common.flag_validator("arms", lambda v: bool(v) and set(v) <= set(ARMS),
                        f"a comma list of arms among {', '.join(ARMS)}")
  common.flag_validator("dense_ratios", lambda v: (x := common.float_list(v)) is not None
                        and all(1 < r <= MAX_DENSE_RATIO for r in x),
                        f"a comma list of numbers in (1, {MAX_DENSE_RATIO}], e.g. 1.2,2")


def sweep_config(values, *, widths: Sequence[int], arms: Sequence[str],
                 dense_ratios: Sequence[float] = ()) -> SweepConfig:
  """The `SweepConfig` of a binary: its grid, and the flags of `define_training_flags`.

  Called by a binary's config function only, with absl's FLAGS as `values` (parsed and
  validated); runs the checks across the training flags, the same for every binary.
  """
  common.validate("warmup_steps", values.warmup_steps < values.chunk_steps
                  or values.warmup_steps % values.chunk_steps == 0,
                  "must be below --chunk_steps (one short chunk) or a multiple of it")
  common.validate("steps", values.steps % values.chunk_steps == 0,
                  "must be a multiple of --chunk_steps")
  devices = len(jax.devices())
  common.validate("batch_size", values.batch_size % devices == 0,
                  f"must be divisible by the {devices} devices of the data mesh")
  boundaries = optimizer_flags.schedule_boundaries(values)
  order = ("dense",) + fpe.SPLITS + ("dropconnect",)
  return SweepConfig(
      widths=tuple(sorted(set(widths))),
      alphas=tuple(sorted(set(common.int_list(values.alphas)))),
      arms=tuple(a for a in order if a in arms),
      dense_ratios=tuple(sorted(set(dense_ratios))), seeds=values.seeds, seed=values.seed,
      warmup_steps=values.warmup_steps, steps=values.steps, chunk_steps=values.chunk_steps,
      batch_size=values.batch_size, optimizer=values.optimizer,
      learning_rate=values.learning_rate, weight_decay=values.weight_decay,
      schedule=values.schedule, schedule_boundaries=boundaries,
      schedule_decay=values.schedule_decay, bias=values.bias, budget=values.budget,
      matmul=values.matmul)


def real_data_sweep_config(values) -> SweepConfig:
  """The `SweepConfig` of the flags of `define_sweep_flags` (see `sweep_config`)."""
  widths, alphas = common.int_list(values.widths), common.int_list(values.alphas)
  common.validate("widths", min(widths) >= max(alphas), "every width must be >= the largest "
                  "of --alphas (each neuron splits into alpha children)")
  return sweep_config(values, widths=widths, arms=values.arms,
                      dense_ratios=common.float_list(values.dense_ratios))
