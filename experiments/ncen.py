r"""NCEn against its peers (independent, GAL, ADP, TRS) under one adversarial evaluation.

  python -m experiments.ncen --flagfile=experiments/flags/ncen_quick.flags
  python -m experiments.ncen --flagfile=experiments/flags/ncen_paper.flags

Each method trains an ensemble of --num_members CNNs (stacked, vmapped; all methods start
from the same initial members) with its loss; a separately seeded independent ensemble is
the black-box surrogate. Every ensemble is then evaluated on the same --n_eval test points:

  clean accuracy (ensemble and members, on the whole test split);
  mean pairwise cosine and mean norm of the members' input gradients;
  white-box L_inf robust accuracy per eps: PGD (--pgd_steps, step eps * --step_fraction,
    random start, --pgd_restarts restarts) with CE and margin losses on every target in
    --targets (the log-mean-prob ensemble, mean logits, max over members' losses, each
    member), FGSM and MIM; a point counts as robust only if it survives all of them;
  black-box accuracy: PGD crafted on the surrogate, judged on the ensemble;
  the member-to-member transfer matrix (PGD on member i, judged on member j and on the
    ensemble, over points every member gets right);
  gradient-masking checks (fpe_jax.attacks.gradient_masking_checks). A failed check is
    printed as a WARNING as soon as its method is evaluated and again at the end, and
    listed under "failed_checks" in results.json.

Outputs in <workdir>/ncen/<run_name>/: flags.txt, metrics.jsonl, results.json, table.txt,
plots/robust_accuracy_vs_eps.png, plots/transfer_matrices.png, checkpoints/<method>/
(orbax, for resume) and evals/<method>.json (finished evaluations, skipped on resume).
"""

import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from experiments import common
from fpe_jax import attacks, ensemble, sharding
from fpe_jax.data import fashion_mnist, mnist5k
from fpe_jax.models import cnn

FLAGS = flags.FLAGS
DATASETS = ("fashion_mnist", "mnist5k")
TARGET_CHOICES = ("ensemble", "mean_logits", "max_member", "members")
SURROGATE = "surrogate"

flags.DEFINE_enum("dataset", "fashion_mnist", DATASETS, "Image data set.")
flags.DEFINE_integer("train_size", 0, "Training images used (0: the whole training split).")
flags.DEFINE_integer("clean_eval_size", 0, "Test images for clean accuracy (0: all).")
flags.DEFINE_integer("n_eval", 1000, "Test images attacked (a fixed subset).")
flags.DEFINE_integer("eval_batch_size", 250, "Images per attack batch; must divide --n_eval.")
flags.DEFINE_enum("architecture", "small", cnn.ARCHITECTURES, "CNN architecture.")
flags.DEFINE_integer("width", 32, "Channels of the first conv.")
flags.DEFINE_integer("hidden", 128, "Dense hidden width of the small CNN.")
flags.DEFINE_enum("activation", "leaky_relu", cnn.ACTIVATIONS, "Activation (GAL needs leaky).")
flags.DEFINE_integer("num_members", 3, "Ensemble members M.")
flags.DEFINE_list("methods", ["independent", "gal", "adp", "trs", "ncen"],
                  f"Training losses to compare, from {list(ensemble.LOSSES)}.")
flags.DEFINE_float("lam_dir", 1.0, "NCEn: weight of mean pairwise gradient cosine.")
flags.DEFINE_float("lam_mag", 1.0, "NCEn: weight of the gradient-magnitude correlation.")
flags.DEFINE_float("lam_ncl", 0.0, "NCEn: weight of the Liu-Yao term (unbounded below).")
flags.DEFINE_float("gal_lam", 0.5, "GAL weight.")
flags.DEFINE_float("adp_alpha", 2.0, "ADP entropy weight.")
flags.DEFINE_float("adp_beta", 0.5, "ADP log-det weight.")
flags.DEFINE_float("trs_coeff", 2.0, "TRS weight of mean |cos|.")
flags.DEFINE_float("trs_lam", 2.0, "TRS weight of the gradient smoothness term.")
flags.DEFINE_float("trs_scale", 1.0, "TRS overall regulariser scale.")
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
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
flags.DEFINE_integer("pgd_steps", 50, "PGD steps.")
flags.DEFINE_integer("pgd_restarts", 5, "PGD random restarts (robust = survives all).")
flags.DEFINE_float("step_fraction", 0.2, "PGD step size as a fraction of eps.")
flags.DEFINE_integer("mim_steps", 10, "MIM iterations (step eps / steps).")
flags.DEFINE_float("mim_decay", 1.0, "MIM momentum decay.")
flags.DEFINE_list("steps_check", ["10"], "Fewer PGD steps compared with --pgd_steps.")
flags.DEFINE_float("check_tolerance", 0.0, "Slack on the monotonicity checks.")
flags.DEFINE_enum("member_map", "auto", ("auto",) + ensemble.MEMBER_MAPS,
                  "How members are applied: vmap, unroll (faster convs on CPU), or auto "
                  "(unroll on CPU with one member device, else vmap). Same numbers.")
flags.DEFINE_integer("member_devices", 1, "Devices on the mesh axis `member` (shards members).")
flags.DEFINE_integer("seed", 0, "Seed of everything.")


def _floats(value):
  try:
    return [float(v) for v in value]
  except ValueError:
    return None


def _ints(value):
  try:
    return [int(v) for v in value]
  except ValueError:
    return None


common.flag_validator("eps", lambda v: bool(v) and (x := _floats(v)) is not None
                      and min(x) >= 0, "must be a non-empty list of numbers >= 0")
common.flag_validator("large_eps", lambda v: v >= 0, "must be >= 0")
common.flag_validator("methods", lambda v: bool(v) and set(v) <= set(ensemble.LOSSES),
                      f"must be a non-empty list from {list(ensemble.LOSSES)}")
common.flag_validator("attacks", lambda v: bool(v) and set(v) <= set(attacks.ATTACKS),
                      f"must be a non-empty list from {list(attacks.ATTACKS)}")
common.flag_validator("attack_losses", lambda v: bool(v) and set(v) <= set(attacks.ATTACK_LOSSES),
                      f"must be a non-empty list from {list(attacks.ATTACK_LOSSES)}")
common.flag_validator("targets", lambda v: bool(v) and set(v) <= set(TARGET_CHOICES),
                      f"must be a non-empty list from {list(TARGET_CHOICES)}")
common.flag_validator("steps_check", lambda v: (x := _ints(v)) is not None and all(
    s >= 1 for s in x), "must be a list of integers >= 1")
for _name in ("num_members", "n_eval", "eval_batch_size", "width", "hidden", "batch_size",
              "train_steps", "chunk_steps", "pgd_steps", "pgd_restarts", "mim_steps",
              "member_devices"):
  common.flag_validator(_name, lambda v: v >= 1, "must be >= 1")
for _name in ("train_size", "clean_eval_size"):
  common.flag_validator(_name, lambda v: v >= 0, "must be >= 0")
for _name in ("learning_rate", "step_fraction"):
  common.flag_validator(_name, lambda v: v > 0, "must be > 0")


# ----------------------------------------------------------------------------- setup


def model_config() -> cnn.CNNConfig:
  mean, std = ((fashion_mnist.PIXEL_MEAN, fashion_mnist.PIXEL_STD)
               if FLAGS.dataset == "fashion_mnist" else (0.1307, 0.3081))  # MNIST statistics
  return cnn.CNNConfig(architecture=FLAGS.architecture, width=FLAGS.width, hidden=FLAGS.hidden,
                       activation=FLAGS.activation, input_mean=mean, input_std=std)


def member_map() -> str:
  if FLAGS.member_map != "auto":
    return FLAGS.member_map
  return "unroll" if jax.default_backend() == "cpu" and FLAGS.member_devices == 1 else "vmap"


def loss_config(name: str) -> ensemble.LossConfig:
  return ensemble.LossConfig(member_map=member_map(),
      name=name, lam_dir=FLAGS.lam_dir, lam_mag=FLAGS.lam_mag, lam_ncl=FLAGS.lam_ncl,
      gal_lam=FLAGS.gal_lam, adp_alpha=FLAGS.adp_alpha, adp_beta=FLAGS.adp_beta,
      trs_coeff=FLAGS.trs_coeff, trs_lam=FLAGS.trs_lam, trs_scale=FLAGS.trs_scale)


def load_data():
  if FLAGS.dataset == "fashion_mnist":
    train = fashion_mnist.load_fashion_mnist("train")
    test = fashion_mnist.load_fashion_mnist("test")
  else:
    train, test = mnist5k.load_mnist5k("train"), mnist5k.load_mnist5k("test")
  if FLAGS.train_size:
    train = tuple(a[:FLAGS.train_size] for a in train)
  if FLAGS.clean_eval_size:
    test = tuple(a[:FLAGS.clean_eval_size] for a in test)
  return train, test


def validate_cross_flags(num_train: int, num_test: int) -> None:
  """Checks that need several flags or the data, before anything is written."""
  members = FLAGS.num_members
  for name in FLAGS.methods:
    common.validate("num_members", not (name in ensemble.CORRELATION_LOSSES and members < 2),
                    f"{members}: method {name!r} compares members and needs --num_members >= 2")
  common.validate("eval_batch_size", FLAGS.n_eval % FLAGS.eval_batch_size == 0,
                  f"{FLAGS.eval_batch_size} must divide --n_eval={FLAGS.n_eval}")
  common.validate("n_eval", FLAGS.n_eval <= num_test,
                  f"{FLAGS.n_eval} exceeds the {num_test} test images")
  common.validate("train_size", FLAGS.train_size <= num_train,
                  f"{FLAGS.train_size} exceeds the {num_train} training images")
  common.validate("train_steps", FLAGS.train_steps % FLAGS.chunk_steps == 0,
                  f"{FLAGS.train_steps} must be a multiple of --chunk_steps={FLAGS.chunk_steps}")
  common.validate("member_devices", members % FLAGS.member_devices == 0
                  and FLAGS.member_devices <= len(jax.devices()),
                  f"{FLAGS.member_devices} must divide --num_members={members} and be at most "
                  f"the {len(jax.devices())} devices")
  common.validate("targets", "ensemble" in FLAGS.targets,
                  "must include 'ensemble' (the black-box attack and the checks use it)")
  common.validate("attack_losses", "ce" in FLAGS.attack_losses,
                  "must include 'ce' (the black-box attack and the checks use it)")
  common.validate("steps_check", all(s <= FLAGS.pgd_steps for s in _ints(FLAGS.steps_check)),
                  f"every entry must be <= --pgd_steps={FLAGS.pgd_steps}")
  try:
    cnn.validate_config(model_config())
  except ValueError as e:
    raise common.UsageError(f"--architecture/--activation: {e}") from e


# ----------------------------------------------------------------------------- training


def train_ensemble(run_dir: common.RunDir, name: str, loss_name: str, key: jax.Array,
                   train, apply_fn, init_fn, mesh) -> ensemble.Params:
  """Trains (or resumes) one ensemble; returns its stacked params."""
  members = FLAGS.num_members
  optimizer = optax.adam(FLAGS.learning_rate)
  stacked = ensemble.init_members(init_fn, jax.random.fold_in(key, 0), members)
  if mesh is not None:
    stacked = ensemble.shard_members(stacked, mesh)
  state = ensemble.init_train_state(stacked, optimizer)
  loss_fn = ensemble.make_loss(apply_fn, loss_config(loss_name), members)
  chunk = jax.jit(ensemble.make_train_chunk(loss_fn, optimizer, batch_size=FLAGS.batch_size,
                                            steps=FLAGS.chunk_steps), donate_argnums=0)
  store, state, start = run_dir.resume(name, state, log_key="method")
  x, y = (jnp.asarray(a) for a in train)
  data_key = jax.random.fold_in(key, 1)
  progress = common.Progress(f"train {name}", FLAGS.train_steps, start=start)
  t0 = time.perf_counter()
  for step in range(start + FLAGS.chunk_steps, FLAGS.train_steps + 1, FLAGS.chunk_steps):
    state, metrics = chunk(state, x, y, data_key)
    metrics = {k: float(v) for k, v in metrics.items()}
    run_dir.log({"method": name, "step": step, **metrics,
                 "seconds": round(time.perf_counter() - t0, 3)})
    store.save(step, state)
    progress.update(step, " ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
  store.close()
  return state.params


# ----------------------------------------------------------------------------- evaluation


def target_names(members: int) -> list[tuple[str, int | None]]:
  names = []
  for target in FLAGS.targets:
    if target == "members":
      names += [("member", i) for i in range(members)]
    else:
      names.append((target, None))
  return names


def label(target: str, member: int | None) -> str:
  return f"member{member}" if target == "member" else target


def objective_table(apply_fn, stacked, x, labels):
  """[T * L, B]: every (target, attack loss) objective, so one program serves them all."""
  logits = ensemble.member_logits(apply_fn, stacked, x, member_map())
  outputs = {"ensemble": ensemble.combine_logits(logits, "log_mean_prob"),
             "mean_logits": ensemble.combine_logits(logits, "mean_logits")}
  rows = []
  for target, member in target_names(logits.shape[0]):
    for loss in FLAGS.attack_losses:
      if target == "max_member":
        per_member = jax.vmap(attacks.attack_loss, in_axes=(0, None, None))(logits, labels, loss)
        rows.append(jnp.max(per_member, axis=0))
      elif target == "member":
        rows.append(attacks.attack_loss(logits[member], labels, loss))
      else:
        rows.append(attacks.attack_loss(outputs[target], labels, loss))
  return jnp.stack(rows)


def make_evaluators(apply_fn):
  """Jitted evaluators whose eps, steps, restarts and objective choice are traced arguments,
  so each compiles once for all methods, radii and targets."""

  def objective(stacked, choice):
    return lambda x, labels: objective_table(apply_fn, stacked, x, labels)[choice]

  def predictor(stacked):
    return attacks.ensemble_predictor(apply_fn, stacked, member_map=member_map())

  @functools.partial(jax.jit, static_argnames="kind")
  def robust(attack_params, judge_params, x, labels, keys, eps, steps, restarts, choice, kind):
    """[B] robust mask: crafted on attack_params (white-box: the judged ensemble itself)."""
    obj = objective(attack_params, choice)
    if kind == "fgsm":
      attack = lambda xb, yb, key: attacks.fgsm(obj, xb, yb, eps)
    elif kind == "mim":
      attack = lambda xb, yb, key: attacks.mim(obj, xb, yb, eps=eps, steps=FLAGS.mim_steps,
                                               decay=FLAGS.mim_decay)
    else:
      attack = lambda xb, yb, key: attacks.pgd(obj, xb, yb, key, eps=eps, steps=steps,
                                               step_size=eps * FLAGS.step_fraction)
    judge = predictor(judge_params)

    def restart(carry, key):
      alive, index = carry
      survived = attacks.predicts(judge, attack(x, labels, key), labels)
      # Restarts beyond `restarts` are computed but ignored (one program for every count).
      return (alive & (survived | (index >= restarts)), index + 1), None

    start = (attacks.predicts(judge, x, labels), jnp.zeros((), jnp.int32))
    return jax.lax.scan(restart, start, keys)[0][0]

  @jax.jit
  def transfer(stacked, x, labels, key, eps):
    return attacks.transfer_counts(apply_fn, stacked, x, labels, key, eps=eps,
                                   steps=FLAGS.pgd_steps, step_size=eps * FLAGS.step_fraction,
                                   member_map=member_map())

  @jax.jit
  def clean(stacked, x, labels):
    logits = ensemble.member_logits(apply_fn, stacked, x, member_map())
    ens = jnp.argmax(ensemble.combine_logits(logits), -1) == labels
    return jnp.sum(ens), jnp.sum(jnp.argmax(logits, -1) == labels, axis=-1)

  @jax.jit
  def grad_stats(stacked, x, labels):
    return ensemble.gradient_statistics(apply_fn, stacked, x, labels, member_map())

  return robust, transfer, clean, grad_stats


def batches(x, y, size):
  for start in range(0, len(y), size):
    yield jnp.asarray(x[start:start + size]), jnp.asarray(y[start:start + size])


def evaluate(name, stacked, surrogate, test, eval_set, evaluators, key) -> dict:
  """All figures of one ensemble (see the module docstring)."""
  robust_fn, transfer_fn, clean_fn, grad_stats_fn = evaluators
  members = FLAGS.num_members
  size = FLAGS.eval_batch_size
  eps_list = _floats(FLAGS.eps)
  names = target_names(members)
  choices = [(label(t, m), loss) for t, m in names for loss in FLAGS.attack_losses]
  ensemble_ce = choices.index(("ensemble", "ce")) if ("ensemble", "ce") in choices else 0
  restarts_keys = jax.random.split(key, FLAGS.pgd_restarts)

  # Clean accuracy over the whole (clean) test split, in attack-sized batches.
  counts = [clean_fn(stacked, xb, yb) for xb, yb in batches(*test, size)]
  record = {"clean_accuracy": sum(int(c) for c, _ in counts) / len(test[1]),
            "member_clean_accuracy": (sum(np.asarray(m) for _, m in counts)
                                      / len(test[1])).tolist()}
  stats = [grad_stats_fn(stacked, xb, yb) for xb, yb in batches(*eval_set, size)]
  record.update({k: float(np.mean([s[k] for s in stats])) for k in stats[0]})

  def accuracy(attack_params, eps, steps, restarts, choice, kind):
    # FGSM and MIM are deterministic and single runs need one key: scan over one key then.
    keys = restarts_keys if restarts > 1 else restarts_keys[:1]
    alive = [robust_fn(attack_params, stacked, xb, yb, keys, eps, steps, restarts,
                       choice, kind=kind) for xb, yb in batches(*eval_set, size)]
    return np.concatenate([np.asarray(a) for a in alive])

  per_eps = {}
  for eps in eps_list:
    t0 = time.perf_counter()
    masks, entry = {}, {"pgd": {}}
    for index, (target, loss) in enumerate(choices):
      if "pgd" in FLAGS.attacks:
        masks[f"pgd/{target}/{loss}"] = accuracy(stacked, eps, FLAGS.pgd_steps,
                                                 FLAGS.pgd_restarts, index, "pgd")
        entry["pgd"][f"{target}/{loss}"] = float(masks[f"pgd/{target}/{loss}"].mean())
    for kind in ("fgsm", "mim"):
      if kind in FLAGS.attacks:
        masks[kind] = accuracy(stacked, eps, 1, 1, ensemble_ce, kind)
        entry[kind] = float(masks[kind].mean())
    white = np.logical_and.reduce(list(masks.values()))
    entry["white_box"] = float(white.mean())
    if "pgd" in FLAGS.attacks:
      entry["pgd_ensemble_ce"] = float(masks[f"pgd/{choices[ensemble_ce][0]}/"
                                             f"{choices[ensemble_ce][1]}"].mean())
      entry["by_target"] = {
          t: float(np.logical_and.reduce([masks[f"pgd/{t}/{loss}"]
                                          for loss in FLAGS.attack_losses]).mean())
          for t in {c[0] for c in choices}}
      entry["black_box"] = float(accuracy(surrogate, eps, FLAGS.pgd_steps, FLAGS.pgd_restarts,
                                          ensemble_ce, "pgd").mean())
      counts = [transfer_fn(stacked, xb, yb, jax.random.fold_in(key, i), eps)
                for i, (xb, yb) in enumerate(batches(*eval_set, size))]
      points = int(sum(int(c["points"]) for c in counts))
      m2m = sum(np.asarray(c["member_to_member"]) for c in counts) / max(points, 1)
      m2e = sum(np.asarray(c["member_to_ensemble"]) for c in counts) / max(points, 1)
      off = ~np.eye(members, dtype=bool)
      entry["transfer"] = {"points": points, "member_to_member": m2m.tolist(),
                           "member_to_ensemble": m2e.tolist(),
                           "mean_offdiagonal": float(m2m[off].mean()) if members > 1 else None,
                           "mean_diagonal": float(np.diag(m2m).mean())}
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    per_eps[str(eps)] = entry
    print(f"  {name} eps={eps}: white-box {entry['white_box']:.3f}"
          + (f", black-box {entry['black_box']:.3f}" if "black_box" in entry else "")
          + f" ({entry['seconds']} s)", flush=True)
  record["robust"] = per_eps
  record["checks"] = run_checks(record, stacked, accuracy, ensemble_ce)
  return record


def run_checks(record, stacked, accuracy, ensemble_ce) -> dict:
  """The gradient-masking checks, with the extra attacks they need."""
  eps_list = _floats(FLAGS.eps)
  per_eps = record["robust"]
  check_eps = eps_list[len(eps_list) // 2]
  inputs = {"white_box_accuracy": {e: per_eps[str(e)]["white_box"] for e in eps_list}}
  if "pgd" not in FLAGS.attacks:
    return {"skipped": "the checks need --attacks to include pgd"}
  large = accuracy(stacked, FLAGS.large_eps, FLAGS.pgd_steps, 1, ensemble_ce, "pgd")
  inputs["large_eps_accuracy"] = float(large.mean())
  inputs["pgd_accuracy"] = {e: per_eps[str(e)]["pgd_ensemble_ce"] for e in eps_list}
  inputs["fgsm_accuracy"] = ({e: per_eps[str(e)]["fgsm"] for e in eps_list}
                             if "fgsm" in FLAGS.attacks else {})
  one_restart = float(accuracy(stacked, check_eps, FLAGS.pgd_steps, 1, ensemble_ce,
                               "pgd").mean())
  inputs["accuracy_by_steps"] = {
      s: float(accuracy(stacked, check_eps, s, 1, ensemble_ce, "pgd").mean())
      for s in sorted(set(_ints(FLAGS.steps_check)) - {FLAGS.pgd_steps})}
  inputs["accuracy_by_steps"][FLAGS.pgd_steps] = one_restart
  # The restarts share their first key with the single run, as in the main evaluation.
  inputs["accuracy_by_restarts"] = {1: one_restart,
                                    FLAGS.pgd_restarts: inputs["pgd_accuracy"][check_eps]}
  inputs["transfer_accuracy"] = [{e: per_eps[str(e)]["black_box"] for e in eps_list}]
  by_target = per_eps[str(check_eps)]["by_target"]
  inputs["accuracy_by_target"] = {t: a for t, a in by_target.items()
                                  if t in ("ensemble", "mean_logits", "max_member")}
  passed = attacks.gradient_masking_checks(
      **inputs, large_eps_threshold=FLAGS.large_eps_threshold, tolerance=FLAGS.check_tolerance)
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


def table(records: dict) -> str:
  eps_list = _floats(FLAGS.eps)
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


def plot(records: dict, folder: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  eps_list = _floats(FLAGS.eps)
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
  ax.set_title(f"{FLAGS.dataset}, {FLAGS.num_members} members")
  fig.tight_layout()
  fig.savefig(os.path.join(folder, "robust_accuracy_vs_eps.png"), dpi=120)
  plt.close(fig)
  eps = eps_list[len(eps_list) // 2]
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
  train, test = load_data()
  validate_cross_flags(len(train[1]), len(test[1]))
  run_dir = common.RunDir("ncen", __name__).open()
  print(f"run directory {run_dir.path}" + (" (resuming)" if run_dir.resumed else ""))
  t0 = time.perf_counter()
  config = model_config()
  apply_fn = functools.partial(cnn.apply_cnn, config=config)
  init_fn = functools.partial(cnn.init_cnn, config=config)
  mesh = None
  if FLAGS.member_devices > 1:
    mesh = sharding.make_mesh({"member": FLAGS.member_devices},
                              devices=jax.devices()[:FLAGS.member_devices])
  key = jax.random.key(FLAGS.seed)
  # The attacked subset: a fixed permutation of the test split.
  order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 7), len(test[1])))
  eval_set = tuple(a[order[:FLAGS.n_eval]] for a in test)

  init_key = jax.random.fold_in(key, 1)  # the same initial members for every method
  surrogate = train_ensemble(run_dir, SURROGATE, "independent", jax.random.fold_in(key, 2),
                             train, apply_fn, init_fn, mesh)
  evaluators = make_evaluators(apply_fn)
  os.makedirs(os.path.join(run_dir.path, "evals"), exist_ok=True)
  records = {}
  for name in FLAGS.methods:
    stacked = train_ensemble(run_dir, name, name, init_key, train, apply_fn, init_fn, mesh)
    path = os.path.join(run_dir.path, "evals", f"{name}.json")
    if os.path.exists(path):
      records[name] = json.loads(common.read_text(path))
      print(f"evaluation of {name}: resumed from {path}")
      continue
    print(f"evaluating {name} on {FLAGS.n_eval} test points", flush=True)
    records[name] = evaluate(name, stacked, surrogate, test, eval_set, evaluators,
                             jax.random.fold_in(key, 3))
    common.write_text(path, json.dumps(records[name], indent=2))
    run_dir.log({"method": name, "evaluation": "done", "clean": records[name]["clean_accuracy"]})
    warn_failed_checks(failed_checks(name, records[name]))  # now, not hours later

  failed = [item for name, r in records.items() for item in failed_checks(name, r)]
  warn_failed_checks(failed)
  text = table(records)
  print(text)
  common.write_text(os.path.join(run_dir.path, "table.txt"), text + "\n")
  plot(records, run_dir.plots)
  results = {"experiment": "ncen", "flags": run_dir.flags_text.splitlines(),
             "dataset": FLAGS.dataset, "train_images": len(train[1]),
             "clean_test_images": len(test[1]), "attacked_images": FLAGS.n_eval,
             "model": config._asdict(), "params_per_member": cnn.count_params(
                 ensemble.unstack_members(surrogate)[0]),
             "methods": records, "failed_checks": failed,
             "all_checks_passed": not failed,
             "seconds": round(time.perf_counter() - t0, 1)}
  path = run_dir.write_results(results)
  print(f"results: {path} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
  common.run(main)
