r"""NCEn against its peers (independent, GAL, ADP, TRS) under one adversarial evaluation.

  python -m experiments.ncen --flagfile=experiments/flags/ncen_quick.flags
  python -m experiments.ncen --flagfile=experiments/flags/ncen_paper.flags

Each method trains an ensemble of --num_members CNNs (stacked, vmapped; all methods start
from the same initial members) with its loss; a separately seeded independent ensemble is
the black-box surrogate. Every ensemble is then evaluated on the same --n_eval test points:

  clean accuracy (ensemble and members, on the whole test split);
  mean pairwise cosine and mean norm of the members' input gradients;
  white-box L_inf robust accuracy per eps: PGD (--pgd_steps, --pgd_schedule: APGD by
    default, its first step eps * --step_fraction, default 2; "fixed": every step that,
    default 0.2; random start, --pgd_restarts restarts) with CE and margin losses on every
    target in
    --targets (the log-mean-prob ensemble, mean logits, max over members' losses, each
    member), FGSM and MIM; a point counts as robust only if it survives all of them;
  black-box accuracy: PGD crafted on the surrogate, judged on the ensemble;
  the member-to-member transfer matrix (PGD on member i, judged on member j and on the
    ensemble, over points every member gets right);
  gradient-masking checks (fpe_jax.attacks.gradient_masking_checks), among them PGD and
    FGSM at --large_eps, and PGD again with half the step and twice the steps, which may
    not find an accuracy more than --masking_check_tolerance lower (else the attack had
    not converged). A failed check is printed as a WARNING as soon as its method is
    evaluated and again at the end, and listed under "failed_checks" in results.json.

Devices: a 2-D mesh `data` x `member` (--data_devices x --member_devices). Members are
split over `member`; each training minibatch is split over `data` and the gradients are
all-reduced by XLA; the attacks run on the member-sharded params with whole batches.

Subsets: --train_size and --clean_eval_size take stratified samples of their split
(`fpe_jax.data.subsets.stratified_subset`, numpy seeded by --seed), never prefixes.

PRNG streams, all from key = jax.random.key(--seed) by `fold_in`:
  fold_in(key, 7)   the permutation of the clean test images (the --clean_eval_size sample
                    of the test split) whose first --n_eval are attacked;
  fold_in(key, 1)   every method's ensemble key (so all methods start from the same members);
  fold_in(key, 2)   the surrogate's ensemble key;
  for an ensemble key k: members are initialised from split(fold_in(k, 0), M), and
    minibatch t is drawn from train.step_key(fold_in(k, 1), t); TRS's smoothness
    perturbation (--trs_plus_adv) starts from fold_in of that step key with 1;
  fold_in(key, 3)   the attack key a, the same for every method: the restarts use
    split(a, --pgd_restarts) (single runs the first of them) for every eps, objective and
    the black-box attack; transfer batch i uses fold_in(a, i), split over the members.

Outputs in <workdir>/ncen/<run_name>/: flags.txt, metrics.jsonl, results.json (with the
run's "config"), table.txt, plots/robust_accuracy_vs_eps.png, plots/transfer_matrices.png,
checkpoints/<method>/ (orbax, for resume) and evals/<method>.json (finished evaluations,
skipped on resume). --trained_from=<other run directories> restores the ensembles those
runs finished instead of training them (their training flags must be this run's), so a
harness can be changed without training again.
"""

import dataclasses
import functools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import common, optimizer_flags
from fpe_jax import attacks, checkpoint, ensemble, sharding, train
from fpe_jax.data import fashion_mnist, mnist5k, subsets
from fpe_jax.models import cnn

FLAGS = flags.FLAGS
DATASETS = ("fashion_mnist", "mnist5k")
TARGET_CHOICES = ("ensemble", "mean_logits", "max_member", "members")
SURROGATE = "surrogate"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

flags.DEFINE_enum("dataset", "fashion_mnist", DATASETS, "Image data set.")
flags.DEFINE_integer("train_size", 0, "Training images used, a stratified sample drawn by "
                     "--seed (0: the whole training split).")
flags.DEFINE_integer("clean_eval_size", 0, "Test images for clean accuracy, a stratified "
                     "sample drawn by --seed (0: all); the attacked ones are drawn from them.")
flags.DEFINE_integer("n_eval", 1000, "Test images attacked (a fixed subset of the clean ones).")
flags.DEFINE_integer("eval_batch_size", 250, "Images per attack batch; must divide --n_eval.")
flags.DEFINE_enum("architecture", "small", cnn.ARCHITECTURES, "CNN architecture.")
flags.DEFINE_integer("width", 32, "Channels of the first conv.")
flags.DEFINE_integer("hidden", 128, "Dense hidden width of the small CNN.")
flags.DEFINE_enum("activation", "leaky_relu", cnn.ACTIVATIONS, "Activation (GAL needs leaky).")
flags.DEFINE_integer("num_members", 3, "Ensemble members M.")
flags.DEFINE_list("methods", ["independent", "gal", "adp", "trs", "ncen"],
                  f"Training losses to compare, from {list(ensemble.LOSSES)}.")
# The loss weights: flags named as ensemble.LossConfig's fields, with its defaults.
LOSS_WEIGHT_FLAGS = {
    "lam_dir": "NCEn: weight of mean pairwise gradient cosine.",
    "lam_mag": "NCEn: weight of the gradient-magnitude correlation.",
    "lam_ncl": "NCEn: weight of the Liu-Yao term (unbounded below).",
    "gal_lam": "GAL weight.",
    "adp_alpha": "ADP entropy weight.",
    "adp_beta": "ADP log-det weight.",
    "trs_coeff": "TRS weight of mean |cos|.",
    "trs_lam": "TRS weight of the gradient smoothness term.",
    "trs_scale": "TRS overall regulariser scale.",
}
for _name, _help in LOSS_WEIGHT_FLAGS.items():
  flags.DEFINE_float(_name, getattr(ensemble.DEFAULT_LOSS_CONFIG, _name), _help)
  common.flag_validator(_name, math.isfinite, "must be a finite number")
# TRS's smoothness perturbation (its official plus_adv), also LossConfig's fields; the radius
# ramps over --train_steps.
TRS_ADV_FLAGS = ("trs_plus_adv", "trs_adv_eps_start", "trs_adv_eps_end", "trs_adv_steps")
flags.DEFINE_bool("trs_plus_adv", ensemble.DEFAULT_LOSS_CONFIG.trs_plus_adv,
                  "TRS: smoothness on the first half of each batch and a PGD-perturbed copy of "
                  "the second half (PGD maximising the smoothness term), not the clean batch.")
flags.DEFINE_float("trs_adv_eps_start", ensemble.DEFAULT_LOSS_CONFIG.trs_adv_eps_start,
                   "TRS: L_inf radius of the perturbation at step 0.")
flags.DEFINE_float("trs_adv_eps_end", ensemble.DEFAULT_LOSS_CONFIG.trs_adv_eps_end,
                   "TRS: the radius it ramps to, linearly over --train_steps.")
flags.DEFINE_integer("trs_adv_steps", ensemble.DEFAULT_LOSS_CONFIG.trs_adv_steps,
                     "TRS: signed-gradient steps of the perturbation (step eps / 3).")
for _name in ("trs_adv_eps_start", "trs_adv_eps_end"):
  common.flag_validator(_name, lambda v: 0 <= v < float("inf"), "must be a finite number >= 0")
common.flag_validator("trs_adv_steps", lambda v: v >= 1, "must be >= 1")
flags.DEFINE_bool("ncen_smoothness", ensemble.DEFAULT_LOSS_CONFIG.ncen_smoothness,
                  "NCEn ablation: add TRS's smoothness term, --trs_scale * --trs_lam times it, "
                  "computed as TRS computes it (--trs_plus_adv and its radius flags apply).")
optimizer_flags.define("of the training step; cosine decays over --train_steps")
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_integer("train_steps", 2000, "Optimiser steps per ensemble.")
flags.DEFINE_integer("chunk_steps", 100, "Steps per jitted chunk (checkpoint interval).")
flags.DEFINE_list("eps", ["0.05", "0.1", "0.15", "0.2"], "L_inf radii (pixels in [0, 1]).")
flags.DEFINE_float("large_eps", 0.5, "An eps at which robust accuracy must be about 0.")
flags.DEFINE_float("large_eps_threshold", 0.05, "Most accuracy allowed at --large_eps.")
flags.DEFINE_list("attacks", ["fgsm", "pgd", "mim"], f"Attacks, from {list(attacks.ATTACKS)}.")
flags.DEFINE_list("attack_losses", ["ce", "margin"],
                  f"PGD losses, from {list(attacks.ATTACK_LOSSES)}.")
flags.DEFINE_list("targets", list(TARGET_CHOICES),
                  f"PGD targets, from {list(TARGET_CHOICES)} ('members': each member).")
flags.DEFINE_integer("pgd_steps", 100, "PGD steps (APGD: one more gradient evaluation).")
flags.DEFINE_integer("pgd_restarts", 5, "PGD random restarts (robust = survives all).")
flags.DEFINE_enum("pgd_schedule", attacks.DEFAULT_PGD_SCHEDULE, attacks.PGD_SCHEDULES,
                  "PGD's step size: apgd (Croce & Hein 2020: momentum, the step halves where "
                  "progress stalls, restarts from the best point) or fixed (one step size).")
flags.DEFINE_float("step_fraction", None, "PGD step size (APGD: its first step) as a fraction "
                   "of eps (default: " + ", ".join(
                       f"{v:g} for {k}" for k, v in attacks.DEFAULT_STEP_FRACTIONS.items())
                   + ").")
flags.DEFINE_integer("mim_steps", 10, "MIM iterations (step eps / steps).")
flags.DEFINE_float("mim_decay", 1.0, "MIM momentum decay.")
flags.DEFINE_list("steps_check", ["10"], "Fewer PGD steps compared with --pgd_steps.")
flags.DEFINE_float("check_tolerance", 0.0, "Slack on the monotonicity checks.")
flags.DEFINE_float("masking_check_tolerance", 0.02,
                   "How much lower PGD with half the step and twice the steps may find the "
                   "accuracy (one restart, the check eps) before the check fails.")
flags.DEFINE_enum("member_map", None, ensemble.MEMBER_MAPS,
                  "How members are applied: vmap or unroll (faster convs on CPU); same "
                  "numbers (default: unroll on CPU with one member device, else vmap).")
flags.DEFINE_integer("member_devices", 1, "Devices on the mesh axis `member` (shards members).")
flags.DEFINE_integer("data_devices", 0, "Devices on the mesh axis `data` (splits each training "
                     "minibatch); 0: all devices / --member_devices.")
flags.DEFINE_integer("seed", 0, "Seed of everything.")
common.seed_validator("seed")
flags.DEFINE_list("trained_from", [], "Evaluate the ensembles other ncen runs trained: their "
                  "run directories (<workdir>/ncen/<run_name>). Each phase (the surrogate, a "
                  "method) is restored from the first of them with a checkpoint at "
                  "--train_steps, instead of trained; the others are trained here. Their flags "
                  "must equal this run's but for the evaluation flags and --methods.")
# The flags that only shape the evaluation: a --trained_from run may differ in these (and
# in where it lives), never in what trains the ensembles.
EVALUATION_FLAGS = ("methods", "clean_eval_size", "n_eval", "eval_batch_size", "eps",
                    "large_eps", "large_eps_threshold", "attacks", "attack_losses", "targets",
                    "pgd_steps", "pgd_restarts", "pgd_schedule", "step_fraction", "mim_steps",
                    "mim_decay", "steps_check", "check_tolerance", "masking_check_tolerance",
                    "trained_from")

common.flag_validator("eps", lambda v: bool(v) and (x := common.float_list(v)) is not None
                      and min(x) >= 0, "must be a non-empty list of numbers >= 0")
common.flag_validator("large_eps", lambda v: v >= 0, "must be >= 0")
for _name in ("large_eps_threshold", "check_tolerance", "masking_check_tolerance"):
  common.flag_validator(_name, lambda v: 0 <= v <= 1, "must be an accuracy, in [0, 1]")
common.flag_validator("mim_decay", lambda v: v >= 0, "must be >= 0")
common.flag_validator("methods", lambda v: bool(v) and set(v) <= set(ensemble.LOSSES),
                      f"must be a non-empty list from {list(ensemble.LOSSES)}")
common.flag_validator("attacks", lambda v: bool(v) and set(v) <= set(attacks.ATTACKS),
                      f"must be a non-empty list from {list(attacks.ATTACKS)}")
common.flag_validator("attack_losses", lambda v: bool(v) and set(v) <= set(attacks.ATTACK_LOSSES),
                      f"must be a non-empty list from {list(attacks.ATTACK_LOSSES)}")
common.flag_validator("targets", lambda v: bool(v) and set(v) <= set(TARGET_CHOICES),
                      f"must be a non-empty list from {list(TARGET_CHOICES)}")
common.flag_validator("steps_check", lambda v: (x := common.int_list(v)) is not None and all(
    s >= 1 for s in x), "must be a list of integers >= 1")
for _name in ("num_members", "n_eval", "eval_batch_size", "width", "hidden", "batch_size",
              "train_steps", "chunk_steps", "pgd_steps", "pgd_restarts", "mim_steps",
              "member_devices"):
  common.flag_validator(_name, lambda v: v >= 1, "must be >= 1")
for _name in ("train_size", "clean_eval_size", "data_devices"):
  common.flag_validator(_name, lambda v: v >= 0, "must be >= 0")
common.flag_validator("step_fraction", lambda v: v is None or 0 < v < float("inf"),
                      "must be a finite number > 0")


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The images.

  Attributes:
    dataset: one of DATASETS.
    train_size: training images used, a stratified sample (0: the whole training split).
    clean_eval_size: test images for clean accuracy, a stratified sample (0: the whole
      test split).
    n_eval: test images attacked (the first of a fixed permutation of the clean ones).
    eval_batch_size: images per evaluation batch; divides n_eval.
  """
  dataset: str
  train_size: int
  clean_eval_size: int
  n_eval: int
  eval_batch_size: int


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How every ensemble is trained.

  Attributes:
    methods: the training losses compared, from ensemble.LOSSES.
    num_members: M.
    optimizer: a train.OPTIMIZERS name.
    learning_rate: its (initial) learning rate.
    weight_decay: L2 (adam, sgd) or decoupled (adamw) weight decay; 0: none.
    schedule: a train.SCHEDULES name, of the training step (cosine: over train_steps).
    schedule_boundaries: for "step", the steps at which the rate is multiplied by
      schedule_decay.
    schedule_decay: for "step", the factor.
    batch_size: images per step (a multiple of the mesh's data devices).
    train_steps: steps per ensemble (a multiple of chunk_steps).
    chunk_steps: steps per jitted chunk, the checkpoint interval.
    trained_from: run directories whose finished ensembles are restored, not trained
      (`restore_trained`); () trains every one.
  """
  methods: tuple[str, ...]
  num_members: int
  optimizer: str
  learning_rate: float
  batch_size: int
  train_steps: int
  chunk_steps: int
  weight_decay: float = 0.0
  schedule: str = "constant"
  schedule_boundaries: tuple[int, ...] = ()
  schedule_decay: float = 0.1
  trained_from: tuple[str, ...] = ()

  def make_optimizer(self):
    """The optax optimiser; a schedule is of its own step count, the training step."""
    schedule = train.make_schedule(
        self.schedule, self.learning_rate, total_steps=self.train_steps,
        boundaries=self.schedule_boundaries, decay_factor=self.schedule_decay)
    return train.make_optimizer(self.optimizer, schedule, weight_decay=self.weight_decay)


@dataclasses.dataclass(frozen=True)
class AttackConfig:
  """The adversarial evaluation.

  Attributes:
    eps: the L_inf radii.
    large_eps: a radius at which robust accuracy must be about 0 (check).
    large_eps_threshold: the most accuracy allowed there.
    attacks: from attacks.ATTACKS.
    objectives: the PGD objectives, every target x attack loss ("members" expanded to each
      member); FGSM, MIM, the black-box attack and the checks use ("ensemble", "ce").
    pgd_steps: PGD steps.
    pgd_restarts: PGD random restarts (robust = survives all).
    pgd_schedule: PGD's step-size schedule, from attacks.PGD_SCHEDULES.
    step_fraction: PGD step size (APGD: its first step) / eps.
    mim_steps: MIM iterations.
    mim_decay: MIM momentum decay.
    steps_check: fewer PGD steps compared with pgd_steps (check).
    check_tolerance: slack on the monotonicity checks.
    masking_check_tolerance: how much lower PGD at half the step and twice the steps may
      find the accuracy (check).
  """
  eps: tuple[float, ...]
  large_eps: float
  large_eps_threshold: float
  attacks: tuple[str, ...]
  objectives: tuple[attacks.ObjectiveChoice, ...]
  pgd_steps: int
  pgd_restarts: int
  pgd_schedule: str
  step_fraction: float
  mim_steps: int
  mim_decay: float
  steps_check: tuple[int, ...]
  check_tolerance: float
  masking_check_tolerance: float

  @property
  def ensemble_ce(self) -> int:
    """The index of the ("ensemble", "ce") objective."""
    return self.objectives.index(attacks.ObjectiveChoice("ensemble", "ce"))

  @property
  def check_eps(self) -> float:
    """The radius of the steps / restarts / target checks: the middle one."""
    return self.eps[len(self.eps) // 2]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The device mesh `data` x `member`.

  Attributes:
    data: devices that split each training minibatch.
    member: devices that split the members (divides num_members).
  """
  data: int
  member: int


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run depends on, read from the flags once (`config_from_flags`).

  Attributes:
    data: the images.
    model: the member architecture.
    loss: the loss weights shared by every method and how members are applied; its `name`
      is replaced by each method's (`loss_config`).
    train: the training of every ensemble.
    attack: the adversarial evaluation.
    mesh: the device mesh.
    seed: the seed of every PRNG stream (module docstring).
  """
  data: DataConfig
  model: cnn.CNNConfig
  loss: ensemble.LossConfig
  train: TrainConfig
  attack: AttackConfig
  mesh: MeshConfig
  seed: int

  def loss_config(self, method: str) -> ensemble.LossConfig:
    return self.loss._replace(name=method)


def expand_targets(targets, losses, members: int) -> tuple[attacks.ObjectiveChoice, ...]:
  """Every (target, loss) pair in flag order; the target "members" is each member."""
  choices = []
  for target in targets:
    pairs = ([("member", i) for i in range(members)] if target == "members"
             else [(target, None)])
    choices += [attacks.ObjectiveChoice(t, loss, m) for t, m in pairs for loss in losses]
  return tuple(choices)


def config_from_flags() -> Config:
  """The run's config: the one place that reads FLAGS, with every check across flags.

  Raises:
    common.UsageError: a one-line `--flag: message` for the first bad combination.
  """
  members = FLAGS.num_members
  for name in FLAGS.methods:
    common.validate("num_members", not (name in ensemble.CORRELATION_LOSSES and members < 2),
                    f"{members}: method {name!r} compares members and needs --num_members >= 2")
  common.validate("eval_batch_size", FLAGS.n_eval % FLAGS.eval_batch_size == 0,
                  f"{FLAGS.eval_batch_size} must divide --n_eval={FLAGS.n_eval}")
  boundaries = optimizer_flags.schedule_boundaries(FLAGS)
  common.validate("schedule_boundaries", all(b < FLAGS.train_steps for b in boundaries),
                  f"{list(boundaries)}: every step must be below --train_steps="
                  f"{FLAGS.train_steps}")
  common.validate("train_steps", FLAGS.train_steps % FLAGS.chunk_steps == 0,
                  f"{FLAGS.train_steps} must be a multiple of --chunk_steps={FLAGS.chunk_steps}")
  devices = len(jax.devices())
  common.validate("member_devices", members % FLAGS.member_devices == 0
                  and FLAGS.member_devices <= devices,
                  f"{FLAGS.member_devices} must divide --num_members={members} and be at most "
                  f"the {devices} devices")
  data_devices = FLAGS.data_devices or devices // FLAGS.member_devices
  common.validate("data_devices", data_devices * FLAGS.member_devices <= devices,
                  f"{data_devices} x --member_devices={FLAGS.member_devices} exceeds the "
                  f"{devices} devices")
  common.validate("batch_size", FLAGS.batch_size % data_devices == 0,
                  f"{FLAGS.batch_size} must be a multiple of the {data_devices} data devices "
                  "(--data_devices)")
  common.validate("targets", "ensemble" in FLAGS.targets,
                  "must include 'ensemble' (the black-box attack and the checks use it)")
  common.validate("attack_losses", "ce" in FLAGS.attack_losses,
                  "must include 'ce' (the black-box attack and the checks use it)")
  steps_check = tuple(common.int_list(FLAGS.steps_check))
  common.validate("steps_check", all(s <= FLAGS.pgd_steps for s in steps_check),
                  f"every entry must be <= --pgd_steps={FLAGS.pgd_steps}")
  mean, std = ((fashion_mnist.PIXEL_MEAN, fashion_mnist.PIXEL_STD)
               if FLAGS.dataset == "fashion_mnist" else (MNIST_MEAN, MNIST_STD))
  model = cnn.CNNConfig(architecture=FLAGS.architecture, width=FLAGS.width, hidden=FLAGS.hidden,
                        activation=FLAGS.activation, input_mean=mean, input_std=std)
  try:
    cnn.validate_config(model)
  except ValueError as e:
    raise common.UsageError(f"--architecture/--activation: {e}") from e
  member_map = FLAGS.member_map or (
      "unroll" if jax.default_backend() == "cpu" and FLAGS.member_devices == 1 else "vmap")
  return Config(
      data=DataConfig(dataset=FLAGS.dataset, train_size=FLAGS.train_size,
                      clean_eval_size=FLAGS.clean_eval_size, n_eval=FLAGS.n_eval,
                      eval_batch_size=FLAGS.eval_batch_size),
      model=model,
      loss=ensemble.LossConfig(
          **{name: FLAGS[name].value for name in (*LOSS_WEIGHT_FLAGS, *TRS_ADV_FLAGS)},
          ncen_smoothness=FLAGS.ncen_smoothness, trs_adv_ramp_steps=FLAGS.train_steps,
          member_map=member_map),
      train=TrainConfig(methods=tuple(FLAGS.methods), num_members=members,
                        optimizer=FLAGS.optimizer, learning_rate=FLAGS.learning_rate,
                        batch_size=FLAGS.batch_size, train_steps=FLAGS.train_steps,
                        chunk_steps=FLAGS.chunk_steps, weight_decay=FLAGS.weight_decay,
                        schedule=FLAGS.schedule,
                        schedule_boundaries=boundaries,
                        schedule_decay=FLAGS.schedule_decay,
                        trained_from=tuple(FLAGS.trained_from)),
      attack=AttackConfig(
          eps=tuple(common.float_list(FLAGS.eps)), large_eps=FLAGS.large_eps,
          large_eps_threshold=FLAGS.large_eps_threshold, attacks=tuple(FLAGS.attacks),
          objectives=expand_targets(FLAGS.targets, FLAGS.attack_losses, members),
          pgd_steps=FLAGS.pgd_steps, pgd_restarts=FLAGS.pgd_restarts,
          pgd_schedule=FLAGS.pgd_schedule,
          step_fraction=(FLAGS.step_fraction if FLAGS.step_fraction is not None
                         else attacks.DEFAULT_STEP_FRACTIONS[FLAGS.pgd_schedule]),
          mim_steps=FLAGS.mim_steps, mim_decay=FLAGS.mim_decay, steps_check=steps_check,
          check_tolerance=FLAGS.check_tolerance,
          masking_check_tolerance=FLAGS.masking_check_tolerance),
      mesh=MeshConfig(data=data_devices, member=FLAGS.member_devices),
      seed=FLAGS.seed)


# ----------------------------------------------------------------------------- setup


def load_data(config: DataConfig, seed: int):
  """(train, test) image/label arrays, cut to the configured sizes (checked against the
  data): stratified samples drawn by `seed` (`subsets.stratified_subset`)."""
  try:
    if config.dataset == "fashion_mnist":
      train_set = fashion_mnist.load_fashion_mnist("train")
      test_set = fashion_mnist.load_fashion_mnist("test")
    else:
      train_set, test_set = mnist5k.load_mnist5k("train"), mnist5k.load_mnist5k("test")
  except (FileNotFoundError, ValueError) as e:  # missing or corrupt: the message names the
    raise common.UsageError(f"--dataset={config.dataset}: {e}") from None  # install script
  common.validate("train_size", config.train_size <= len(train_set[1]),
                  f"{config.train_size} exceeds the {len(train_set[1])} training images")
  common.validate("clean_eval_size", config.clean_eval_size <= len(test_set[1]),
                  f"{config.clean_eval_size} exceeds the {len(test_set[1])} test images")
  # Stratified samples, not prefixes: MNIST-5k is stored sorted by label.
  if config.train_size:
    with common.blame("train_size"):
      keep = subsets.stratified_subset(train_set[1], config.train_size, seed)
    train_set = tuple(a[keep] for a in train_set)
  if config.clean_eval_size:
    with common.blame("clean_eval_size"):
      keep = subsets.stratified_subset(test_set[1], config.clean_eval_size, seed)
    test_set = tuple(a[keep] for a in test_set)
  # The attacked points are drawn from the clean test images, so after the cut.
  common.validate("n_eval", config.n_eval <= len(test_set[1]),
                  f"{config.n_eval} exceeds the {len(test_set[1])} clean test images it is "
                  f"drawn from (--clean_eval_size={config.clean_eval_size}; 0: all)")
  return train_set, test_set


def make_mesh(config: MeshConfig) -> jax.sharding.Mesh:
  """The `data` x `member` mesh over the first data * member devices."""
  return sharding.make_mesh({"data": config.data, "member": config.member},
                            devices=jax.devices()[:config.data * config.member])


# ----------------------------------------------------------------------------- training


def train_ensemble(run_dir: common.RunDir, config: Config, phase: str, method: str,
                   key: jax.Array, train_set, apply_fn, init_fn, mesh) -> ensemble.Params:
  """Trains (or resumes) one ensemble with loss `method`; returns its stacked params.

  Args:
    run_dir: the open run directory.
    config: the run's config.
    phase: the checkpoint folder and log name (the method, or the surrogate).
    method: the training loss, from ensemble.LOSSES.
    key: the ensemble key (module docstring: members from fold_in(key, 0), minibatches
      from fold_in(key, 1)).
    train_set: (x [n, 28, 28, 1], y [n]) replicated on the mesh.
    apply_fn, init_fn: one member's CNN.
    mesh: the `data` x `member` mesh.
  """
  members = config.train.num_members
  optimizer = config.train.make_optimizer()
  stacked = ensemble.init_members(init_fn, jax.random.fold_in(key, 0), members)
  # The whole state on the mesh, scalars (step, the optimiser's count) replicated: a
  # checkpoint restores each leaf onto its template's devices.
  state = sharding.shard_tree(train.init_state(stacked, optimizer), mesh, sharding.MEMBER_RULES)
  for source in config.train.trained_from:
    restored = restore_trained(run_dir, source, phase, state, config.train.train_steps)
    if restored is not None:
      return restored.params
  loss_fn = ensemble.make_loss(apply_fn, config.loss_config(method), members)
  x, y = train_set
  chunk = jax.jit(train.make_train_chunk(
      loss_fn, optimizer, batch_size=config.train.batch_size, steps=config.train.chunk_steps,
      batch_sharding=sharding.batch_sharding(mesh, x.ndim), with_step=True), donate_argnums=0)
  progress = common.Progress(f"train {phase}", config.train.train_steps)
  state = common.train_phase(run_dir, phase, state, chunk, x, y, jax.random.fold_in(key, 1),
                             end_step=config.train.train_steps,
                             chunk_steps=config.train.chunk_steps, progress=progress,
                             log_key="method")
  return state.params


def _flag_name(line: str) -> str:
  """The flag a flags.txt line sets (`--noX` sets the boolean X)."""
  name = line.removeprefix("--").split("=", 1)[0].strip()
  return name[2:] if name not in FLAGS and name.startswith("no") and name[2:] in FLAGS else name


def training_flags(flags_text: str) -> dict[str, str]:
  """{flag: its flags.txt line} for the flags that decide what the ensembles learn: all
  but where the run lives and EVALUATION_FLAGS."""
  lines = common.scientific_flags(flags_text).splitlines()
  return {_flag_name(line): line for line in lines if _flag_name(line) not in EVALUATION_FLAGS}


def check_trained_from(source: str, flags_text: str) -> None:
  """Refuses --trained_from unless it is an ncen run trained with this run's flags. A flag
  the source's flags.txt lacks (added to the binary since) must be at its default here."""
  path = os.path.join(source, "flags.txt")
  if not os.path.isfile(path):
    raise common.UsageError(f"--trained_from={source}: no flags.txt there; give an ncen run "
                            "directory (<workdir>/ncen/<run_name>)")
  ours, theirs = training_flags(flags_text), training_flags(common.read_text(path))
  added_since_at_default = lambda name: (name not in theirs
                                        and FLAGS[name].value == FLAGS[name].default)
  names = sorted(name for name in ours.keys() | theirs.keys()
                 if ours.get(name) != theirs.get(name) and not added_since_at_default(name))
  if names:
    raise common.UsageError(
        f"--trained_from={source}: trained with other values of --{', --'.join(names)} (see "
        f"its flags.txt); only the evaluation flags and --methods may differ")


def restore_trained(run_dir: common.RunDir, source: str, phase: str, like, steps: int):
  """`phase`'s state at step `steps` from the run directory `source`, or None if it has
  none (not trained there, or not finished); logged in this run's metrics.jsonl."""
  folder = os.path.join(source, "checkpoints", phase)
  if not os.path.isdir(folder):  # Checkpoints() would create it
    return None
  store = checkpoint.Checkpoints(folder)
  try:
    if store.latest_step() != steps:
      return None
    state = store.restore(steps, like)
  finally:
    store.close()
  print(f"{phase}: restored from {folder} (step {steps}), not trained here", flush=True)
  run_dir.log({"method": phase, "restored_from": os.path.abspath(folder), "restored_step": steps})
  return state


# ----------------------------------------------------------------------------- evaluation


def make_evaluators(apply_fn, config: Config):
  """Jitted evaluators whose eps, steps, step fraction, restarts and objective choice are
  traced arguments, so each compiles once for all methods, radii, objectives and checks."""
  member_map = config.loss.member_map
  attack = config.attack

  @functools.partial(jax.jit, static_argnames="kind")
  def robust(attack_params, judge_params, x, labels, keys, eps, steps, step_fraction,
             restarts, choice, kind):
    """[B] robust mask: crafted on attack_params (white-box: the judged ensemble itself)."""
    objective = attacks.select_objective(
        attacks.objective_table(apply_fn, attack_params, attack.objectives, member_map), choice)
    if kind == "mim":
      attack_fn = attacks.make_attack("mim", objective, eps=eps, steps=attack.mim_steps,
                                      decay=attack.mim_decay)
    else:
      attack_fn = attacks.make_attack(kind, objective, eps=eps, steps=steps,
                                      step_size=eps * step_fraction,
                                      schedule=attack.pgd_schedule)
    judge = attacks.ensemble_predictor(apply_fn, judge_params, member_map=member_map)
    return attacks.robust_mask(judge, attack_fn, x, labels, keys, restarts)

  @jax.jit
  def transfer(stacked, x, labels, key, eps):
    return attacks.transfer_counts(apply_fn, stacked, x, labels, key, eps=eps,
                                   steps=attack.pgd_steps, step_size=eps * attack.step_fraction,
                                   schedule=attack.pgd_schedule, member_map=member_map)

  @jax.jit
  def clean(stacked, x, labels):
    logits = ensemble.member_logits(apply_fn, stacked, x, member_map)
    ens = jnp.argmax(ensemble.combine_logits(logits), -1) == labels
    return jnp.sum(ens), jnp.sum(jnp.argmax(logits, -1) == labels, axis=-1)

  @jax.jit
  def grad_stats(stacked, x, labels):
    return ensemble.gradient_statistics(apply_fn, stacked, x, labels, member_map)

  return robust, transfer, clean, grad_stats


def batches(x, y, size):
  for start in range(0, len(y), size):
    yield jnp.asarray(x[start:start + size]), jnp.asarray(y[start:start + size])


def evaluate(config: Config, name, stacked, surrogate, test, eval_set, evaluators, key) -> dict:
  """All figures of one ensemble (see the module docstring); `key` is the attack key."""
  robust_fn, transfer_fn, clean_fn, grad_stats_fn = evaluators
  attack = config.attack
  members = config.train.num_members
  size = config.data.eval_batch_size
  objectives = attack.objectives
  ensemble_ce = attack.ensemble_ce
  restarts_keys = jax.random.split(key, attack.pgd_restarts)

  # Clean accuracy over the whole (clean) test split, in attack-sized batches.
  counts = [clean_fn(stacked, xb, yb) for xb, yb in batches(*test, size)]
  record = {"clean_accuracy": sum(int(c) for c, _ in counts) / len(test[1]),
            "member_clean_accuracy": (sum(np.asarray(m) for _, m in counts)
                                      / len(test[1])).tolist()}
  stats = [grad_stats_fn(stacked, xb, yb) for xb, yb in batches(*eval_set, size)]
  record.update({k: float(np.mean([s[k] for s in stats])) for k in stats[0]})

  def accuracy(attack_params, eps, steps, restarts, choice, kind, step_fraction=None):
    # FGSM and MIM are deterministic and single runs need one key: scan over one key then.
    keys = restarts_keys if restarts > 1 else restarts_keys[:1]
    fraction = attack.step_fraction if step_fraction is None else step_fraction
    alive = [robust_fn(attack_params, stacked, xb, yb, keys, eps, steps, fraction, restarts,
                       choice, kind=kind) for xb, yb in batches(*eval_set, size)]
    return np.concatenate([np.asarray(a) for a in alive])

  # One line per attack run: the PGD objectives, FGSM, MIM, black-box and transfer.
  with_pgd = "pgd" in attack.attacks
  runs_per_eps = (len(objectives) + 2) * with_pgd + sum(k in attack.attacks
                                                        for k in ("fgsm", "mim"))
  progress = common.Progress(f"evaluate {name}", len(attack.eps) * runs_per_eps, unit="attacks")
  per_eps = {}
  for eps in attack.eps:
    t0 = time.perf_counter()
    masks, entry = {}, {"pgd": {}}
    for index, objective in enumerate(objectives):
      if with_pgd:
        masks[f"pgd/{objective.label}"] = accuracy(stacked, eps, attack.pgd_steps,
                                                   attack.pgd_restarts, index, "pgd")
        entry["pgd"][objective.label] = float(masks[f"pgd/{objective.label}"].mean())
        progress.advance(1, f"[eps {eps} PGD {objective.label}]")
    for kind in ("fgsm", "mim"):
      if kind in attack.attacks:
        masks[kind] = accuracy(stacked, eps, 1, 1, ensemble_ce, kind)
        entry[kind] = float(masks[kind].mean())
        progress.advance(1, f"[eps {eps} {kind.upper()}]")
    white = np.logical_and.reduce(list(masks.values()))
    entry["white_box"] = float(white.mean())
    if with_pgd:
      entry["pgd_ensemble_ce"] = float(masks[f"pgd/{objectives[ensemble_ce].label}"].mean())
      entry["by_target"] = {
          target: float(np.logical_and.reduce([masks[f"pgd/{o.label}"] for o in objectives
                                               if o.target_label == target]).mean())
          for target in {o.target_label for o in objectives}}
      entry["black_box"] = float(accuracy(surrogate, eps, attack.pgd_steps, attack.pgd_restarts,
                                          ensemble_ce, "pgd").mean())
      progress.advance(1, f"[eps {eps} black-box]")
      entry["transfer"] = transfer_entry(
          [transfer_fn(stacked, xb, yb, jax.random.fold_in(key, i), eps)
           for i, (xb, yb) in enumerate(batches(*eval_set, size))], members)
      progress.advance(1, f"[eps {eps} transfer]")
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    per_eps[str(eps)] = entry
    print(f"  {name} eps={eps}: white-box {entry['white_box']:.3f}"
          + (f", black-box {entry['black_box']:.3f}" if "black_box" in entry else "")
          + f" ({entry['seconds']} s)", flush=True)
  record["robust"] = per_eps
  record["checks"] = run_checks(attack, record, stacked, accuracy)
  return record


def transfer_entry(counts: list[dict], members: int) -> dict:
  """Transfer rates from the per-batch `attacks.transfer_counts`."""
  points = int(sum(int(c["points"]) for c in counts))
  m2m = sum(np.asarray(c["member_to_member"]) for c in counts) / max(points, 1)
  m2e = sum(np.asarray(c["member_to_ensemble"]) for c in counts) / max(points, 1)
  off = ~np.eye(members, dtype=bool)
  return {"points": points, "member_to_member": m2m.tolist(),
          "member_to_ensemble": m2e.tolist(),
          "mean_offdiagonal": float(m2m[off].mean()) if members > 1 else None,
          "mean_diagonal": float(np.diag(m2m).mean())}


def run_checks(attack: AttackConfig, record, stacked, accuracy) -> dict:
  """The gradient-masking checks, with the extra attacks they need."""
  per_eps = record["robust"]
  check_eps = attack.check_eps
  ensemble_ce = attack.ensemble_ce
  inputs = {"white_box_accuracy": {e: per_eps[str(e)]["white_box"] for e in attack.eps}}
  if "pgd" not in attack.attacks:
    return {"skipped": "the checks need --attacks to include pgd"}
  large = accuracy(stacked, attack.large_eps, attack.pgd_steps, 1, ensemble_ce, "pgd")
  inputs["large_eps_accuracy"] = float(large.mean())
  # FGSM there too, whether or not --attacks lists it: one step of a gradient that points the
  # right way destroys the image as well.
  inputs["large_eps_single_step_accuracy"] = float(
      accuracy(stacked, attack.large_eps, 1, 1, ensemble_ce, "fgsm").mean())
  inputs["pgd_accuracy"] = {e: per_eps[str(e)]["pgd_ensemble_ce"] for e in attack.eps}
  inputs["fgsm_accuracy"] = ({e: per_eps[str(e)]["fgsm"] for e in attack.eps}
                             if "fgsm" in attack.attacks else {})
  one_restart = float(accuracy(stacked, check_eps, attack.pgd_steps, 1, ensemble_ce,
                               "pgd").mean())
  inputs["accuracy_by_steps"] = {
      s: float(accuracy(stacked, check_eps, s, 1, ensemble_ce, "pgd").mean())
      for s in sorted(set(attack.steps_check) - {attack.pgd_steps})}
  inputs["accuracy_by_steps"][attack.pgd_steps] = one_restart
  # Half the step, twice the steps, the same start: a plateau shows as a lower accuracy
  # (more steps at the same step cannot show it).
  inputs["accuracy_by_refinement"] = {
      1: one_restart,
      2: float(accuracy(stacked, check_eps, 2 * attack.pgd_steps, 1, ensemble_ce, "pgd",
                        step_fraction=attack.step_fraction / 2).mean())}
  # The restarts share their first key with the single run, as in the main evaluation.
  inputs["accuracy_by_restarts"] = {1: one_restart,
                                    attack.pgd_restarts: inputs["pgd_accuracy"][check_eps]}
  inputs["transfer_accuracy"] = [{e: per_eps[str(e)]["black_box"] for e in attack.eps}]
  by_target = per_eps[str(check_eps)]["by_target"]
  inputs["accuracy_by_target"] = {t: a for t, a in by_target.items()
                                  if t in ("ensemble", "mean_logits", "max_member")}
  passed = attacks.gradient_masking_checks(
      **inputs, large_eps_threshold=attack.large_eps_threshold,
      tolerance=attack.check_tolerance, refinement_tolerance=attack.masking_check_tolerance)
  return {"passed": passed, "check_eps": check_eps,
          "inputs": json.loads(json.dumps(inputs, default=float))}


# ----------------------------------------------------------------------------- reporting


def failed_checks(name: str, record: dict) -> list[str]:
  return [f"{name}/{check}" for check, ok in record["checks"].get("passed", {}).items()
          if not ok]


def warn_failed_checks(failed: list[str]) -> None:
  for item in failed:
    message = f"WARNING: gradient-masking check FAILED: {item}"
    print(message, flush=True)
    print(message, file=sys.stderr, flush=True)


def table(records: dict, eps_list) -> str:
  head = (["method", "clean"] + [f"WB@{e:g}" for e in eps_list] + [f"BB@{e:g}" for e in eps_list]
          + ["transfer", "cos", "|g|", "checks"])
  rows = []
  for name, r in records.items():
    robust = r["robust"]
    transfers = [robust[str(e)].get("transfer", {}).get("mean_offdiagonal") for e in eps_list]
    transfer_txt = "/".join("-" if t is None else f"{t:.2f}" for t in transfers)
    passed = r["checks"].get("passed", {})
    rows.append([name, f"{r['clean_accuracy']:.3f}"]
                + [f"{robust[str(e)]['white_box']:.3f}" for e in eps_list]
                + [f"{robust[str(e)].get('black_box', float('nan')):.3f}" for e in eps_list]
                + [transfer_txt, f"{r['mean_pairwise_cosine']:.3f}", f"{r['mean_grad_norm']:.3g}",
                   "ok" if all(passed.values()) else
                   "FAIL:" + ",".join(k for k, v in passed.items() if not v)])
  widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
  fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True))
  lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
  lines.append("WB: white-box robust accuracy (worst case over PGD targets x losses x restarts, "
               "FGSM, MIM); BB: black-box (PGD on a surrogate ensemble); transfer: mean "
               "member-to-member PGD success per eps; cos / |g|: mean pairwise cosine / mean "
               "norm of members' input gradients.")
  return "\n".join(lines)


def plot(records: dict, folder: str, config: Config) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  eps_list = config.attack.eps
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, (name, r) in enumerate(records.items()):
    color = f"C{i}"
    ax.plot(eps_list, [r["robust"][str(e)]["white_box"] for e in eps_list], "o-", color=color,
            label=f"{name} white-box")
    if "black_box" in r["robust"][str(eps_list[0])]:
      ax.plot(eps_list, [r["robust"][str(e)]["black_box"] for e in eps_list], "s--",
              color=color, alpha=0.6, label=f"{name} black-box")
  ax.set_xlabel("L_inf eps")
  ax.set_ylabel("robust accuracy")
  ax.set_ylim(0, 1)
  ax.legend(fontsize=7)
  ax.set_title(f"{config.data.dataset}, {config.train.num_members} members")
  fig.tight_layout()
  fig.savefig(os.path.join(folder, "robust_accuracy_vs_eps.png"), dpi=120)
  plt.close(fig)
  eps = config.attack.check_eps
  with_transfer = {n: r for n, r in records.items() if "transfer" in r["robust"][str(eps)]}
  if not with_transfer:
    return
  fig, axes = plt.subplots(1, len(with_transfer), figsize=(2.6 * len(with_transfer) + 1, 3.4),
                           squeeze=False, constrained_layout=True)
  for ax, (name, r) in zip(axes[0], with_transfer.items(), strict=True):
    matrix = np.asarray(r["robust"][str(eps)]["transfer"]["member_to_member"])
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    for (i, j), v in np.ndenumerate(matrix):
      ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.5 else "k",
              fontsize=7)
    ax.set_title(name, fontsize=9)
    ax.set_xticks(range(len(matrix)))
    ax.set_yticks(range(len(matrix)))
    ax.set_xlabel("judged on member")
  axes[0][0].set_ylabel("crafted on member")
  fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="PGD success rate")
  fig.suptitle(f"member-to-member transfer, eps={eps:g}", fontsize=9)
  fig.savefig(os.path.join(folder, "transfer_matrices.png"), dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv):
  if len(argv) > 1:
    raise common.UsageError(f"unexpected arguments {argv[1:]}; use --flags")
  common.maybe_initialize_distributed()
  config = config_from_flags()
  run_dir = common.RunDir("ncen", __name__).check()
  for source in config.train.trained_from:
    check_trained_from(source, run_dir.flags_text)
  train_set, test = load_data(config.data, config.seed)
  run_dir.open()
  print(f"run directory {run_dir.path}" + (" (resuming)" if run_dir.resumed else ""))
  t0 = time.perf_counter()
  apply_fn = functools.partial(cnn.apply_cnn, config=config.model)
  init_fn = functools.partial(cnn.init_cnn, config=config.model)
  mesh = make_mesh(config.mesh)
  print(f"mesh: data {config.mesh.data} x member {config.mesh.member} "
        f"({jax.devices()[0].platform}), members applied by {config.loss.member_map}")
  train_set = tuple(jax.device_put(a, sharding.replicated(mesh)) for a in train_set)
  key = jax.random.key(config.seed)
  # The attacked subset: a fixed permutation of the test split.
  order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 7), len(test[1])))
  eval_set = tuple(a[order[:config.data.n_eval]] for a in test)

  ensemble_key = jax.random.fold_in(key, 1)  # the same initial members for every method
  surrogate = train_ensemble(run_dir, config, SURROGATE, "independent",
                             jax.random.fold_in(key, 2), train_set, apply_fn, init_fn, mesh)
  evaluators = make_evaluators(apply_fn, config)
  os.makedirs(os.path.join(run_dir.path, "evals"), exist_ok=True)
  records = {}
  for name in config.train.methods:
    stacked = train_ensemble(run_dir, config, name, name, ensemble_key, train_set, apply_fn,
                             init_fn, mesh)
    path = os.path.join(run_dir.path, "evals", f"{name}.json")
    if os.path.exists(path):
      records[name] = json.loads(common.read_text(path))
      print(f"evaluation of {name}: resumed from {path}")
      continue
    print(f"evaluating {name} on {config.data.n_eval} test points", flush=True)
    records[name] = evaluate(config, name, stacked, surrogate, test, eval_set, evaluators,
                             jax.random.fold_in(key, 3))
    common.write_text(path, json.dumps(records[name], indent=2))
    run_dir.log({"method": name, "evaluation": "done", "clean": records[name]["clean_accuracy"]})
    warn_failed_checks(failed_checks(name, records[name]))  # now, not hours later

  failed = [item for name, r in records.items() for item in failed_checks(name, r)]
  warn_failed_checks(failed)
  text = table(records, config.attack.eps)
  print(text)
  common.write_text(os.path.join(run_dir.path, "table.txt"), text + "\n")
  plot(records, run_dir.plots, config)
  results = {"experiment": "ncen", "flags": run_dir.flags_text.splitlines(),
             "config": common.config_record(config),
             "dataset": config.data.dataset, "train_images": len(train_set[1]),
             "clean_test_images": len(test[1]), "attacked_images": config.data.n_eval,
             "model": config.model._asdict(), "params_per_member": cnn.count_params(
                 ensemble.unstack_members(surrogate)[0]),
             "methods": records, "failed_checks": failed,
             "all_checks_passed": not failed,
             "seconds": round(time.perf_counter() - t0, 1)}
  path = run_dir.write_results(results)
  print(f"results: {path} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
  common.run(main)
