"""Ensembles as one vmapped model, and the gradient-diversity training losses.

Member params are stacked on a leading axis ([M, ...] for every leaf) and applied with
`jax.vmap`, so M members cost one batched call and the member axis can be sharded over a
mesh axis named `member`. `member_map="unroll"` applies the members one after another
inside the same program instead: on CPU, XLA lowers a vmapped convolution over stacked
kernels to a grouped convolution that runs several times slower than M plain ones
(measured by experiments/bench_ncen.py). On GPU/TPU, where grouped convolutions are
native, vmap is the intended path and the one that shards (not measured here).

The ensemble's output is the log of the mean of the members' softmax (the peers'
convention); mean logits is an option.

Losses (papers.md section 3; every loss returns `(scalar, metrics)`):

  g_i(x) = grad_x CE(f_i(x), y)                   input gradient of member i, per example
  independent: sum_i CE_i
  NCEn:        sum_i CE_i + lam_dir * mean_{i<j} cos(g_i, g_j)
                          + lam_mag * mean_{i<j} corr_batch(|g_i|, |g_j|)
                          + lam_ncl * sum_i (g_i - gbar) . sum_{j!=i} (g_j - gbar)
                          [+ trs_scale * trs_lam * smooth, TRS's smoothness term below,
                             with ncen_smoothness: an ablation, not the paper's NCEn]
  GAL:         mean_i CE_i + lam * log sum_{i<j} exp(cos(g_i, g_j))
  ADP:         sum_i CE_i - alpha * H(mean_i p_i) - beta * log det(G + det_offset * I),
               G the Gram matrix of the members' unit-normalised non-true-class probabilities
  TRS:         sum_i CE_i + scale * (coeff * mean_{i<j} |cos(h_i, h_j)| + lam * smooth),
               h_i = g_i / B the input gradient of member i's batch-MEAN CE, smooth the mean
               over members of 2 * mean_b ||h_i||^2, on the clean batch or (plus_adv) on
               its first half and a PGD-perturbed copy of its second half
  TRS per example: the same with g_i itself and the clean batch only (smoothness B^2 x TRS's)

CE terms are means over the batch; cosines are per example, then averaged over the batch.
TRS follows its official code (AI-secure/Transferability-Reduced-Smooth-Ensemble,
train/Empirical/trainer.py, TRS_Trainer and PGD; papers.md). `make_loss` turns a loss into
a `fpe_jax.train.LossFn`, so ensembles train through the one chunk builder,
`train.make_train_chunk`; the losses that contain g are differentiated w.r.t. the params
through grad_x (double backprop).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from fpe_jax import sharding, train

Params = Any
# One member's (params, x [B, ...]) -> logits [B, C]: no masks (train.ApplyFn takes them).
MemberApplyFn = Callable[[Params, jax.Array], jax.Array]

COMBINES = ("log_mean_prob", "mean_logits")
MEMBER_MAPS = ("vmap", "unroll")
LOSSES = ("independent", "ncen", "gal", "adp", "trs", "trs_per_example")
# Losses that compare members with each other and so need at least two of them.
CORRELATION_LOSSES = ("ncen", "gal", "adp", "trs", "trs_per_example")
MEMBER_AXIS = "member"

# Norms are computed as sqrt(sum of squares + _SQ_FLOOR) so that their gradient stays
# finite at 0; cosines divide by max(|a| |b|, _COS_EPS) like torch's cosine_similarity.
_SQ_FLOOR = 1e-30
_COS_EPS = 1e-8
# TRS's smoothness PGD: step eps / 3 (its official code's), and the constant its random
# start folds into the step key (the minibatch stream uses the step key itself).
TRS_ADV_STEP_FRACTION = 1.0 / 3.0
_TRS_ADV_STREAM = 1


# --------------------------------------------------------------------------- members


def init_members(init_fn: Callable[[jax.Array], Params], key: jax.Array,
                 num_members: int) -> Params:
  """Initialises `num_members` members from independent keys, stacked on axis 0."""
  if num_members < 1:
    raise ValueError(f"num_members={num_members} must be >= 1")
  # One compiled program: eager vmap dispatches every op of init_fn separately.
  return jax.jit(jax.vmap(init_fn))(jax.random.split(key, num_members))


def stack_members(members: Sequence[Params]) -> Params:
  """Stacks a list of same-structured param trees into one tree with leaves [M, ...]."""
  if not members:
    raise ValueError("members must be a non-empty sequence of param trees")
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *members)


def unstack_members(stacked: Params) -> list[Params]:
  """Inverse of `stack_members`."""
  return [jax.tree.map(lambda leaf, i=i: leaf[i], stacked) for i in range(num_members(stacked))]


def num_members(stacked: Params) -> int:
  """M, the leading axis shared by every leaf of a stacked param tree."""
  sizes = {leaf.shape[0] for leaf in jax.tree.leaves(stacked)}
  if len(sizes) != 1:
    raise ValueError(f"stacked params have inconsistent leading (member) axes {sorted(sizes)}")
  return sizes.pop()


def map_members(fn: Callable[..., Any], per_member: Any, *shared: Any,
                member_map: str = "vmap") -> Any:
  """fn(member_i, *shared) for every member, outputs stacked on a new leading axis.

  Args:
    fn: (one member's slice of per_member, *shared) -> pytree.
    per_member: a pytree whose leaves all have the member axis first (stacked params, or a
      tuple of stacked params and [M] keys).
    *shared: arguments every member sees whole.
    member_map: "vmap" (one batched computation) or "unroll" (M computations in sequence
      in the same program; faster for convolutions on CPU).

  Returns:
    fn's outputs with leaves [M, ...].
  """
  if member_map == "vmap":
    return jax.vmap(fn, in_axes=(0,) + (None,) * len(shared))(per_member, *shared)
  if member_map == "unroll":
    count = {leaf.shape[0] for leaf in jax.tree.leaves(per_member)}.pop()
    outputs = [fn(jax.tree.map(lambda leaf, i=i: leaf[i], per_member), *shared)
               for i in range(count)]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *outputs)
  raise ValueError(f"member_map={member_map!r} is not one of {list(MEMBER_MAPS)}")


def member_logits(apply_fn: MemberApplyFn, stacked: Params, x: jax.Array,
                  member_map: str = "vmap") -> jax.Array:
  """Every member's logits on the same inputs.

  Args:
    apply_fn: (params, x [B, ...]) -> logits [B, C] of one member.
    stacked: member params with leaves [M, ...].
    x: [B, ...] inputs.
    member_map: "vmap" or "unroll" (see `map_members`); same numbers either way.

  Returns:
    [M, B, C] logits.
  """
  return map_members(apply_fn, stacked, x, member_map=member_map)


def combine_logits(logits: jax.Array, combine: str = "log_mean_prob") -> jax.Array:
  """Ensemble output from member logits.

  Args:
    logits: [M, B, C] member logits.
    combine: "log_mean_prob" (log of the mean softmax; a normalised log-probability) or
      "mean_logits".

  Returns:
    [B, C] ensemble scores (argmax = ensemble prediction).
  """
  if combine == "log_mean_prob":
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return jax.nn.logsumexp(log_probs, axis=0) - jnp.log(logits.shape[0])
  if combine == "mean_logits":
    return jnp.mean(logits, axis=0)
  raise ValueError(f"combine={combine!r} is not one of {list(COMBINES)}")


def ensemble_logits(apply_fn: MemberApplyFn, stacked: Params, x: jax.Array,
                    combine: str = "log_mean_prob", member_map: str = "vmap") -> jax.Array:
  """[B, C] ensemble output of the stacked members on x [B, ...]."""
  return combine_logits(member_logits(apply_fn, stacked, x, member_map), combine)


def member_sharding(stacked: Params, mesh: Mesh, axis: str = MEMBER_AXIS) -> Params:
  """NamedShardings that split every leaf's member axis over mesh axis `axis`.

  The member count must be divisible by the mesh axis size.
  """
  if axis not in mesh.axis_names:
    raise ValueError(f"mesh has no axis {axis!r}; its axes are {list(mesh.axis_names)}")
  size = mesh.shape[axis]
  count = num_members(stacked)
  if count % size:
    raise ValueError(f"{count} members cannot be split over mesh axis {axis!r} of size {size}")
  return sharding.tree_shardings(stacked, mesh, ((r".*", PartitionSpec(axis)),))


def shard_members(stacked: Params, mesh: Mesh, axis: str = MEMBER_AXIS) -> Params:
  """Places stacked params so that members are split over mesh axis `axis`."""
  return jax.device_put(stacked, member_sharding(stacked, mesh, axis))


# --------------------------------------------------------------------------- gradients


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy: logits [..., B, C], labels [B] -> [..., B]."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=log_probs.dtype)
  return -jnp.sum(log_probs * one_hot, axis=-1)


def input_gradients(apply_fn: MemberApplyFn, stacked: Params, x: jax.Array, labels: jax.Array,
                    member_map: str = "vmap") -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each member's per-example CE and its gradient w.r.t. the input.

  Examples do not interact inside a member (no batch statistics), so the gradient of the
  batch-summed CE w.r.t. x holds every example's own input gradient.

  Args:
    apply_fn: one member's (params, x) -> logits.
    stacked: member params, leaves [M, ...].
    x: [B, ...] inputs.
    labels: [B] int labels.
    member_map: "vmap" or "unroll" (see `map_members`).

  Returns:
    ce: [M, B] per-example cross-entropy.
    logits: [M, B, C].
    grads: [M, B, ...] input gradients g_i(x).
  """

  def member(params):
    def summed_ce(inputs):
      logits = apply_fn(params, inputs)
      ce = cross_entropy(logits, labels)
      return jnp.sum(ce), (ce, logits)

    grads, (ce, logits) = jax.grad(summed_ce, has_aux=True)(x)
    return ce, logits, grads

  return map_members(member, stacked, member_map=member_map)


def _flatten_examples(grads: jax.Array) -> jax.Array:
  """[M, B, ...] -> [M, B, D]."""
  return grads.reshape(grads.shape[0], grads.shape[1], -1)


def _safe_norm(v: jax.Array, axis: int = -1) -> jax.Array:
  return jnp.sqrt(jnp.sum(v * v, axis=axis) + _SQ_FLOOR)


def _pairs(count: int) -> tuple[np.ndarray, np.ndarray]:
  """Index arrays (i, j) of all pairs i < j among `count` members."""
  return np.triu_indices(count, k=1)


def pairwise_cosine(grads: jax.Array) -> jax.Array:
  """Per-example cosine between every two members' input gradients.

  Args:
    grads: [M, B, ...] input gradients.

  Returns:
    [M, M, B] cosines (symmetric in the first two axes; ones on the diagonal for
    non-zero gradients).
  """
  flat = _flatten_examples(grads)
  norms = _safe_norm(flat)  # [M, B]
  dots = jnp.einsum("ibd,jbd->ijb", flat, flat)
  return dots / jnp.maximum(norms[:, None] * norms[None, :], _COS_EPS)


def _upper_pairs(matrix: jax.Array) -> jax.Array:
  """[M, M, ...] -> [P, ...], the entries with i < j."""
  i, j = _pairs(matrix.shape[0])
  return matrix[i, j]


def direction_term(grads: jax.Array) -> jax.Array:
  """NCEn direction term: mean over pairs i<j and over the batch of cos(g_i, g_j)."""
  return jnp.mean(_upper_pairs(pairwise_cosine(grads)))


def gradient_norms(grads: jax.Array) -> jax.Array:
  """[M, B, ...] -> [M, B] per-example L2 norms of the input gradients."""
  return _safe_norm(_flatten_examples(grads))


def magnitude_term(grads: jax.Array) -> jax.Array:
  """NCEn magnitude term: mean over pairs i<j of the batch Pearson correlation of |g_i|, |g_j|.

  |g| is the per-example L2 norm of the input gradient; the correlation is taken over the
  B examples of the batch (B >= 2).
  """
  norms = gradient_norms(grads)  # [M, B]
  centred = norms - jnp.mean(norms, axis=1, keepdims=True)
  scale = _safe_norm(centred)  # [M]
  corr = (centred @ centred.T) / jnp.maximum(scale[:, None] * scale[None, :], _COS_EPS)
  return jnp.mean(_upper_pairs(corr))


def liu_yao_term(grads: jax.Array) -> jax.Array:
  """Liu & Yao's negative-correlation penalty on input gradients, averaged over the batch.

  sum_i (g_i - gbar) . sum_{j != i} (g_j - gbar) per example. Since the deviations sum to
  zero this equals -sum_i ||g_i - gbar||^2: minimising it spreads the gradients apart.
  """
  flat = _flatten_examples(grads)
  deviations = flat - jnp.mean(flat, axis=0, keepdims=True)  # [M, B, D]
  others = jnp.sum(deviations, axis=0, keepdims=True) - deviations
  return jnp.mean(jnp.sum(deviations * others, axis=(0, 2)))


def gal_term(grads: jax.Array) -> jax.Array:
  """GAL coherence: log sum_{i<j} exp(cos(g_i, g_j)) per example, averaged over the batch."""
  return jnp.mean(jax.nn.logsumexp(_upper_pairs(pairwise_cosine(grads)), axis=0))


def trs_cosine_term(grads: jax.Array) -> jax.Array:
  """TRS alignment: mean over pairs i<j and the batch of |cos(g_i, g_j)|."""
  return jnp.mean(jnp.abs(_upper_pairs(pairwise_cosine(grads))))


def mean_squared_gradient_norm(grads: jax.Array) -> jax.Array:
  """Mean over members and examples of ||g_i(x)||^2."""
  flat = _flatten_examples(grads)
  return jnp.mean(jnp.sum(flat * flat, axis=-1))


def trs_smoothness(mean_ce_grads: jax.Array) -> jax.Array:
  """TRS's smoothness term as its official code computes it.

  Args:
    mean_ce_grads: [M, B, ...] input gradients of each member's batch-MEAN cross-entropy
      (each example's own gradient divided by B).

  Returns:
    the mean over members of 2 * mean_b ||mean_ce_grads[i, b]||^2.
  """
  return 2.0 * mean_squared_gradient_norm(mean_ce_grads)


def ensemble_entropy(logits: jax.Array, log_offset: float = 1e-20) -> jax.Array:
  """ADP: mean over the batch of the entropy of the members' mean softmax.

  Args:
    logits: [M, B, C] member logits.
    log_offset: added inside the log, as in the ADP code.

  Returns:
    scalar entropy (nats).
  """
  mean_probs = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)
  return jnp.mean(-jnp.sum(mean_probs * jnp.log(mean_probs + log_offset), axis=-1))


def adp_log_det(logits: jax.Array, labels: jax.Array, det_offset: float = 1e-6) -> jax.Array:
  """ADP diversity: mean over the batch of log det(G + det_offset * I).

  G[i, j] = <q_i, q_j>, q_i the unit-normalised probabilities of member i with the true
  class removed. Orthogonal q's give log det ~ 0; identical ones give
  log(det_offset^(M-1) * (M + det_offset)).

  Args:
    logits: [M, B, C] member logits.
    labels: [B] int labels.
    det_offset: keeps the Gram matrix invertible.

  Returns:
    scalar mean log-determinant.
  """
  count, _, classes = logits.shape
  probs = jax.nn.softmax(logits, axis=-1)
  keep = 1.0 - jax.nn.one_hot(labels, classes, dtype=probs.dtype)  # [B, C]
  non_true = probs * keep  # the true class contributes 0 to every inner product
  unit = non_true / _safe_norm(non_true)[..., None]
  gram = jnp.einsum("ibc,jbc->bij", unit, unit) + det_offset * jnp.eye(count)
  return jnp.mean(jnp.linalg.slogdet(gram)[1])


# --------------------------------------------------------------------------- losses


class LossConfig(NamedTuple):
  """Which training loss and its weights (defaults: papers.md and the peers' code).

  Attributes:
    name: one of LOSSES.
    lam_dir: NCEn weight of the direction (cosine) term.
    lam_mag: NCEn weight of the magnitude-correlation term.
    lam_ncl: NCEn weight of the Liu-Yao term (unbounded below: it rewards growing gradient
      spread, so keep it small).
    gal_lam: GAL weight.
    adp_alpha: ADP entropy weight.
    adp_beta: ADP log-det weight.
    adp_log_offset: ADP's offset inside log of the entropy.
    adp_det_offset: ADP's ridge on the Gram matrix.
    trs_coeff: TRS weight of mean |cos| (its launcher's `coeff`).
    trs_lam: TRS weight of the smoothness term (`lamda`).
    trs_scale: TRS overall scale of its regulariser (`scale`).
    trs_plus_adv: TRS computes its smoothness on the first half of the batch and a
      perturbed copy of the second half (`trs_smoothness_perturbation`) instead of on the
      clean batch (its `plus_adv`).
    trs_adv_eps_start: the perturbation's L_inf radius at step 0 (`init_eps`).
    trs_adv_eps_end: the radius it ramps to, linearly, over trs_adv_ramp_steps (`adv_eps`).
    trs_adv_steps: the perturbation's sign-gradient steps (6 in the official code).
    trs_adv_ramp_steps: training steps over which the radius ramps (the run's length);
      needed (>= 1) by "trs" with trs_plus_adv.
    ncen_smoothness: "ncen" adds TRS's smoothness term, trs_scale * trs_lam * smooth,
      computed as "trs" computes it (trs_plus_adv and the radius settings included): the
      ablation that asks whether a gradient-norm penalty stops NCEn's gradients growing.
    member_map: how members are applied, "vmap" or "unroll" (see `map_members`).
  """
  name: str = "independent"
  lam_dir: float = 1.0
  lam_mag: float = 1.0
  lam_ncl: float = 0.0
  gal_lam: float = 0.5
  adp_alpha: float = 2.0
  adp_beta: float = 0.5
  adp_log_offset: float = 1e-20
  adp_det_offset: float = 1e-6
  trs_coeff: float = 2.0
  trs_lam: float = 2.0
  trs_scale: float = 5.0
  trs_plus_adv: bool = True
  trs_adv_eps_start: float = 0.1
  trs_adv_eps_end: float = 0.2
  trs_adv_steps: int = 6
  trs_adv_ramp_steps: int = 0
  ncen_smoothness: bool = False
  member_map: str = "vmap"


DEFAULT_LOSS_CONFIG = LossConfig()


def _perturbs(config: LossConfig) -> bool:
  """Whether the loss takes TRS's smoothness on a perturbed batch (random, scheduled)."""
  uses_smoothness = config.name == "trs" or (config.name == "ncen" and config.ncen_smoothness)
  return uses_smoothness and config.trs_plus_adv


def validate_loss(config: LossConfig, members: int) -> None:
  """Raises ValueError naming the bad field: unknown loss, < 2 members for a pairwise one,
  or a TRS perturbation setting out of range."""
  if config.name not in LOSSES:
    raise ValueError(f"loss={config.name!r} is not one of {list(LOSSES)}")
  if config.member_map not in MEMBER_MAPS:
    raise ValueError(f"member_map={config.member_map!r} is not one of {list(MEMBER_MAPS)}")
  if members < 1:
    raise ValueError(f"num_members={members} must be >= 1")
  if config.name in CORRELATION_LOSSES and members < 2:
    raise ValueError(f"num_members={members}: loss={config.name!r} compares members and needs "
                     "num_members >= 2")
  for field in ("trs_adv_eps_start", "trs_adv_eps_end"):
    if not 0 <= getattr(config, field) < float("inf"):
      raise ValueError(f"{field}={getattr(config, field)} must be a finite number >= 0")
  if config.trs_adv_steps < 1:
    raise ValueError(f"trs_adv_steps={config.trs_adv_steps} must be >= 1")
  if config.trs_adv_ramp_steps < 0:
    raise ValueError(f"trs_adv_ramp_steps={config.trs_adv_ramp_steps} must be >= 0")
  if _perturbs(config) and config.trs_adv_ramp_steps < 1:
    raise ValueError(f"trs_adv_ramp_steps={config.trs_adv_ramp_steps}: loss={config.name!r} "
                     "with trs_plus_adv ramps its radius over the training steps; give their "
                     "number (>= 1)")


def independent_loss(
    apply_fn: MemberApplyFn, stacked: Params, x: jax.Array, labels: jax.Array,
    config: LossConfig = DEFAULT_LOSS_CONFIG) -> tuple[jax.Array, dict[str, jax.Array]]:
  """sum_i mean_b CE_i: members trained independently (no input gradients needed)."""
  logits = member_logits(apply_fn, stacked, x, config.member_map)
  ce = jnp.mean(cross_entropy(logits, labels), axis=1)  # [M]
  loss = jnp.sum(ce)
  return loss, {"loss": loss, "ce": jnp.mean(ce)}


def ncen_loss(apply_fn: MemberApplyFn, stacked: Params, x: jax.Array, labels: jax.Array,
              config: LossConfig = DEFAULT_LOSS_CONFIG, *, key: jax.Array | None = None,
              step: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """NCEn: sum CE + lam_dir * direction + lam_mag * magnitude + lam_ncl * Liu-Yao.

  With ncen_smoothness, + trs_scale * trs_lam * TRS's smoothness term, exactly as
  `trs_loss` computes it (key and step: its perturbation's, with trs_plus_adv).
  """
  ce, _, grads = input_gradients(apply_fn, stacked, x, labels, config.member_map)
  ce_sum = jnp.sum(jnp.mean(ce, axis=1))
  direction = direction_term(grads)
  magnitude = magnitude_term(grads)
  liu_yao = liu_yao_term(grads)
  loss = (ce_sum + config.lam_dir * direction + config.lam_mag * magnitude
          + config.lam_ncl * liu_yao)
  metrics = {}
  if config.ncen_smoothness:
    smooth, metrics = _trs_smoothness_term(apply_fn, stacked, x, labels, grads, config, key, step)
    loss = loss + config.trs_scale * config.trs_lam * smooth
    metrics["smoothness"] = smooth
  return loss, {"loss": loss, "ce": jnp.mean(ce), "cosine": direction,
                "magnitude_corr": magnitude, "liu_yao": liu_yao, **metrics,
                "grad_norm": jnp.mean(gradient_norms(grads))}


def gal_loss(apply_fn: MemberApplyFn, stacked: Params, x: jax.Array, labels: jax.Array,
             config: LossConfig = DEFAULT_LOSS_CONFIG) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GAL: mean_i CE_i + gal_lam * log sum_{i<j} exp(cos(g_i, g_j))."""
  ce, _, grads = input_gradients(apply_fn, stacked, x, labels, config.member_map)
  coherence = gal_term(grads)
  loss = jnp.mean(ce) + config.gal_lam * coherence
  return loss, {"loss": loss, "ce": jnp.mean(ce), "gal": coherence,
                "cosine": direction_term(grads), "grad_norm": jnp.mean(gradient_norms(grads))}


def adp_loss(apply_fn: MemberApplyFn, stacked: Params, x: jax.Array, labels: jax.Array,
             config: LossConfig = DEFAULT_LOSS_CONFIG) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ADP: sum_i CE_i - adp_alpha * H(mean prob) - adp_beta * log det(Gram)."""
  logits = member_logits(apply_fn, stacked, x, config.member_map)
  ce = jnp.mean(cross_entropy(logits, labels), axis=1)
  entropy = ensemble_entropy(logits, config.adp_log_offset)
  log_det = adp_log_det(logits, labels, config.adp_det_offset)
  loss = jnp.sum(ce) - config.adp_alpha * entropy - config.adp_beta * log_det
  return loss, {"loss": loss, "ce": jnp.mean(ce), "entropy": entropy, "log_det": log_det}


def trs_adv_eps(config: LossConfig, step: jax.Array) -> jax.Array:
  """The radius of TRS's smoothness perturbation at training step `step`.

  Linear from trs_adv_eps_start at step 0 to trs_adv_eps_end at step trs_adv_ramp_steps,
  held there after: the official code's `(adv_eps - init_eps) * epoch / epochs + init_eps`
  with the step as the unit, so its last step, ramp_steps - 1, is 1 / ramp_steps short
  of the end, as the official last epoch is.
  """
  fraction = jnp.clip(jnp.asarray(step, jnp.float32) / config.trs_adv_ramp_steps, 0.0, 1.0)
  return config.trs_adv_eps_start + (config.trs_adv_eps_end - config.trs_adv_eps_start) * fraction


def trs_smoothness_perturbation(apply_fn: MemberApplyFn, stacked: Params, x: jax.Array,
                                labels: jax.Array, key: jax.Array, eps: jax.Array | float,
                                steps: int, member_map: str = "vmap") -> jax.Array:
  """TRS's perturbed copy of x: L_inf PGD that MAXIMISES its smoothness term on x.

  The objective is `trs_smoothness` of the members' input gradients of their mean CE over
  x's own examples (not cross-entropy: the attack seeks where the members are least
  smooth). Uniform random start in the eps ball, `steps` signed steps of eps *
  TRS_ADV_STEP_FRACTION, every iterate projected onto the ball and the [0, 1] box. The
  members' params are constants here: the loss is not differentiated through the attack.

  Args:
    apply_fn: one member's (params, x) -> logits.
    stacked: member params, leaves [M, ...].
    x: [N, ...] inputs in [0, 1].
    labels: [N] int labels.
    key: PRNG key of the random start.
    eps: L_inf radius (may be traced).
    steps: signed-gradient steps.
    member_map: "vmap" or "unroll" (see `map_members`).

  Returns:
    [N, ...] the last iterate.
  """
  stacked = jax.lax.stop_gradient(stacked)

  def smoothness(inputs):
    _, _, grads = input_gradients(apply_fn, stacked, inputs, labels, member_map)
    return trs_smoothness(grads / inputs.shape[0])

  # The attacks' own ball projection and random start (imported here: attacks imports
  # this module).
  from fpe_jax import attacks  # noqa: PLC0415

  def ascend(_, x_adv):
    step = eps * TRS_ADV_STEP_FRACTION * jnp.sign(jax.grad(smoothness)(x_adv))
    return attacks.project(x_adv + step, x, eps)

  start = attacks.random_start_point(key, x, eps)
  return jax.lax.stop_gradient(jax.lax.fori_loop(0, steps, ascend, start))


def _trs_smoothness_term(apply_fn: MemberApplyFn, stacked: Params, x: jax.Array,
                         labels: jax.Array, grads: jax.Array, config: LossConfig,
                         key: jax.Array | None, step: jax.Array | None
                         ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """TRS's smoothness term of `trs_loss`, and {"adv_eps": radius} with trs_plus_adv.

  grads: [M, B, ...] the members' per-example input gradients on the clean batch x (used
  as they are without trs_plus_adv).
  """
  count = x.shape[0]
  if not config.trs_plus_adv:
    return trs_smoothness(grads / count), {}
  if key is None or step is None:
    raise ValueError(f"loss={config.name!r} with trs_plus_adv needs key and step (its "
                     "perturbation's random start and radius)")
  eps = trs_adv_eps(config, step)
  clean = count // 2
  perturbed = trs_smoothness_perturbation(apply_fn, stacked, x[clean:], labels[clean:], key,
                                          eps, config.trs_adv_steps, config.member_map)
  _, _, smooth_grads = input_gradients(apply_fn, stacked, jnp.concatenate([x[:clean], perturbed]),
                                       labels, config.member_map)
  return trs_smoothness(smooth_grads / count), {"adv_eps": eps}


def trs_loss(apply_fn: MemberApplyFn, stacked: Params, x: jax.Array, labels: jax.Array,
             config: LossConfig = DEFAULT_LOSS_CONFIG, *, key: jax.Array | None = None,
             step: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """TRS as its official code trains it.

  sum_i CE_i + trs_scale * (trs_coeff * mean_{i<j} mean_b |cos(h_i, h_j)|
  + trs_lam * trs_smoothness), h_i the input gradients of member i's batch-mean CE on the
  clean batch. With trs_plus_adv the smoothness is taken on [the first B // 2 examples;
  `trs_smoothness_perturbation` of the other B - B // 2 at radius `trs_adv_eps(step)`] with
  the gradients of the mean CE over all B of them; otherwise on the clean batch.

  Args:
    apply_fn, stacked, x, labels: as `input_gradients`; x in [0, 1] for trs_plus_adv.
    config: the weights and the perturbation.
    key: PRNG key of the perturbation's random start (trs_plus_adv only).
    step: the training step, for the radius ramp (trs_plus_adv only).

  Returns:
    (loss, metrics): metrics "abs_cosine" and "smoothness" are the two terms, "adv_eps" the
    radius (trs_plus_adv); "cosine" and "grad_norm" are of each example's own gradient,
    like the other losses'.
  """
  ce, _, grads = input_gradients(apply_fn, stacked, x, labels, config.member_map)
  abs_cos = trs_cosine_term(grads / x.shape[0])
  smooth, metrics = _trs_smoothness_term(apply_fn, stacked, x, labels, grads, config, key, step)
  loss = (jnp.sum(jnp.mean(ce, axis=1))
          + config.trs_scale * (config.trs_coeff * abs_cos + config.trs_lam * smooth))
  return loss, {"loss": loss, "ce": jnp.mean(ce), "abs_cosine": abs_cos, "smoothness": smooth,
                **metrics, "cosine": direction_term(grads),
                "grad_norm": jnp.mean(gradient_norms(grads))}


def trs_per_example_loss(
    apply_fn: MemberApplyFn, stacked: Params, x: jax.Array, labels: jax.Array,
    config: LossConfig = DEFAULT_LOSS_CONFIG) -> tuple[jax.Array, dict[str, jax.Array]]:
  """A strong-penalty TRS variant (this library's earlier "trs"), not the official one.

  sum CE + trs_scale * (trs_coeff * mean |cos(g_i, g_j)| + trs_lam * 2 * mean ||g||^2) with
  g each example's OWN input gradient (not the batch-mean CE's g / B), on the clean batch
  (trs_plus_adv is ignored). Its cosine term is TRS's (a cosine ignores the 1/B, up to
  the eps of its denominator); its smoothness term is B^2 times `trs_smoothness`. The
  earlier runs used trs_scale=1, so against "trs" at its defaults (scale 5) the smoothness
  penalty is B^2 / 5 times the official one (3,277x at B=128) and the cosine's 1/5.
  """
  ce, _, grads = input_gradients(apply_fn, stacked, x, labels, config.member_map)
  abs_cos = trs_cosine_term(grads)
  smooth = mean_squared_gradient_norm(grads)
  loss = (jnp.sum(jnp.mean(ce, axis=1))
          + config.trs_scale * (config.trs_coeff * abs_cos + config.trs_lam * 2.0 * smooth))
  return loss, {"loss": loss, "ce": jnp.mean(ce), "abs_cosine": abs_cos, "sq_grad_norm": smooth,
                "cosine": direction_term(grads), "grad_norm": jnp.mean(gradient_norms(grads))}


_LOSS_FNS = {"independent": independent_loss, "ncen": ncen_loss, "gal": gal_loss,
             "adp": adp_loss, "trs": trs_loss, "trs_per_example": trs_per_example_loss}


def make_loss(apply_fn: MemberApplyFn, config: LossConfig, members: int) -> train.LossFn:
  """The loss `config.name` over M stacked members, as a `train.LossFn`.

  Args:
    apply_fn: one member's (params, x) -> logits.
    config: the loss and its weights.
    members: M, for validation (the pairwise losses need M >= 2).

  Returns:
    `loss_fn(stacked, masks, x [B, ...], labels [B], step_key, step=None) -> (loss,
    metrics)`; `masks` is ignored (dense members). Only TRS's smoothness with trs_plus_adv
    ("trs", or "ncen" with ncen_smoothness) is random and scheduled: its perturbation
    starts from `fold_in(step_key, 1)` and its radius ramps with `step` (train it with
    `train.make_train_chunk(..., with_step=True)`); the other losses ignore both.
  """
  validate_loss(config, members)
  loss = functools.partial(_LOSS_FNS[config.name], apply_fn, config=config)
  perturbed = _perturbs(config)

  def loss_fn(stacked, masks, x, labels, step_key, step=None):
    del masks
    if not perturbed:
      return loss(stacked, x, labels)
    if step is None:
      raise ValueError(f"loss={config.name!r} with trs_plus_adv ramps its radius with the "
                       "training step: pass step (train.make_train_chunk(..., with_step=True))")
    return loss(stacked, x, labels, key=jax.random.fold_in(step_key, _TRS_ADV_STREAM),
                step=step)

  return loss_fn


def gradient_statistics(apply_fn: MemberApplyFn, stacked: Params, x: jax.Array, labels: jax.Array,
                        member_map: str = "vmap") -> dict[str, jax.Array]:
  """Diagnostics reported for every ensemble, whatever it was trained with.

  Returns:
    mean_pairwise_cosine: mean over pairs i<j and the batch of cos(g_i, g_j) (needs M >= 2,
      NaN otherwise); mean_grad_norm: mean ||g_i(x)||; magnitude_corr: the NCEn magnitude
      term (needs M >= 2 and B >= 2).
  """
  _, _, grads = input_gradients(apply_fn, stacked, x, labels, member_map)
  if grads.shape[0] < 2:
    nan = jnp.array(jnp.nan, jnp.float32)
    return {"mean_pairwise_cosine": nan, "mean_grad_norm": jnp.mean(gradient_norms(grads)),
            "magnitude_corr": nan}
  return {"mean_pairwise_cosine": direction_term(grads),
          "mean_grad_norm": jnp.mean(gradient_norms(grads)),
          "magnitude_corr": magnitude_term(grads)}
