"""Mixtures of sparse experts for one linear layer (Sparse Expansion, papers.md section 2).

An expanded linear is an `ExpertBank`: a NamedTuple pytree of its router (PCA basis and
centroids), its stacked expert weights `w: [E, d_in, d_out]` and their static 0/1 masks
(data beside the weights, never jit-static). Expert e is the dense weight pruned by
SparseGPT with the Hessian of the calibration tokens routed to e. Each token uses exactly
one expert (hard top-1 routing, see fpe_jax.cluster.route), so the per-token cost is that
of one sparse matrix. A single pruned (or dense) matrix is the bank with one expert and no
router (`single_expert`), so every compressed linear has one type.

  bank, ids = expand_linear(key, w, x, E, sparsity=0.5)   # fit the router, prune E experts
  y = apply_expert_linear(bank, x)                         # route, then each token's expert
  wd = expert_weighted_wasserstein(bank.w, x, ids)         # [d_out] expert-weighted WD

Linears that share a router (e.g. a SwiGLU FFN's gate and up projections) are built with
`build_experts(..., router=bank.router)` on the first one's ids, and applied with those ids.

`apply_experts(..., implementation=)` takes the one vocabulary of
kernels_pallas.implementations (its IMPLEMENTATIONS): "xla" runs XLA ops, "pallas"
kernels_pallas.expert_matmul, which skips all-zero weight blocks and needs the host-built
`BlockSparseMask.from_masks(masks)` as `block_mask` (`with_block_mask`), and "auto" is
"pallas" on TPU / GPU when a `block_mask` is given, "xla" otherwise.
How "xla" multiplies is a separate choice, `xla_strategy=` (XLA_STRATEGIES), by default
"tiled" on CPU and "ragged_dot" elsewhere:
  "tiled"       tokens sorted by expert into row tiles of `tile_size` (each expert's group
                padded to whole tiles, at most E extra tiles), one [tile, d_in] @
                [d_in, d_out] matmul per tile in a sequential map, unsorted: about the FLOPs
                of one dense matmul.
  "ragged_dot"  tokens sorted by expert, one grouped matmul (`lax.ragged_dot`), unsorted.
                XLA's CPU backend costs about as much as running every expert on every
                token (E dense matmuls), hence "tiled" there.
  "onehot"      every expert on every token, then the routed one selected: E times the
                FLOPs; the plain reference.

The expert axis shards over the mesh axis `expert` (`expert_shardings`, `shard_experts`);
`apply_experts_sharded` is the expert-parallel apply: each device multiplies only the
tokens routed to its own experts, and one psum over `expert` assembles the output. These
are for expert-parallel Sparse Expansion on a multi-device host; tests/test_experts.py
checks them on fake CPU devices. `prune_experts(mesh=)` spreads the K expert prunes over
`expert` (the pipeline, fpe_jax.sparse_expansion, does so when given a mesh).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from fpe_jax import cluster, metrics, sharding, sparse
from kernels_pallas import implementations
from kernels_pallas.block_sparse import BlockSparseMask
from kernels_pallas.expert_matmul import expert_matmul

XLA_STRATEGIES = ("tiled", "ragged_dot", "onehot")
EXPERT_AXIS = "expert"
# Expert banks: their fields w / mask ([E, d_in, d_out], paths `.../.w`) shard their first
# axis over `expert`; everything else (routers, block metadata) is replicated. Rules are
# (regex, spec), as in fpe_jax.sharding.
EXPERT_BANK_RULES = ((r"(.*/)?\.(w|mask)", PartitionSpec(EXPERT_AXIS, None, None)),)


def expert_partition_spec() -> PartitionSpec:
  """PartitionSpec of a stacked [E, d_in, d_out] expert bank: experts over `expert`.

  For expert-parallel placement and apply (`apply_experts_sharded`'s in_specs).
  """
  return PartitionSpec(EXPERT_AXIS, None, None)


class ExpertBank(NamedTuple):
  """One linear layer as E sparse experts behind a hard top-1 router (a pytree).

  Its arrays are its leaves, so a bank (or a dict of banks) goes through jit, vmap,
  device_put and orbax as it is; `None` fields are empty subtrees.

  Attributes:
    w: [E, d_in, d_out] expert weights, exactly zero off-mask.
    mask: [E, d_in, d_out] float 0/1 static masks (1 = kept).
    router: `cluster.fit_router`'s router ({"mean": [d_in], "components": [d_in, p],
      "centroids": [E, p]}), or None: one expert (E = 1, a single model) or experts whose
      ids the caller passes.
    block_mask: optional `BlockSparseMask.from_masks(mask)`, host-built block metadata for
      the Pallas expert matmul (`with_block_mask`). Derived from `mask`: not model state
      (drop it with `bank._replace(block_mask=None)` before saving).
  """

  w: jax.Array
  mask: jax.Array
  router: cluster.Router | None = None
  block_mask: BlockSparseMask | None = None

  @property
  def num_experts(self) -> int:
    return self.w.shape[0]


def storage_bytes(bank: ExpertBank, *, value_bytes: int = 4,
                  n_m: tuple[int, int] | None = None) -> dict[str, int]:
  """Bytes of a bank's weights as it stores them, and as compressed formats would.

  Args:
    bank: an ExpertBank ([E, d_in, d_out] weights and masks; its router is counted apart).
    value_bytes: bytes per weight value (4: float32, 2: bf16).
    n_m: the bank's n:m pattern (n of every m pruned along d_in), if it has one.

  Returns:
    {"dense": one dense [d_in, d_out] matrix (what the bank replaces),
     "stored": the E dense copies the bank holds (what the kernels read, zeros included),
     "csr": per expert, the kept values + a column index each (int16 when d_out <= 2**16,
       else int32) + d_in + 1 int32 row offsets,
     "bitmask": per expert, the kept values + one bit per weight,
     "n_m" (with n_m): the kept values + ceil(log2 m) bits of position each (2:4: 2 bits,
       the sparse tensor cores' metadata),
     "router": the router's float32 arrays (0 without one)}.
  """
  e, d_in, d_out = bank.w.shape
  kept = int(np.count_nonzero(np.asarray(bank.mask)))
  index_bytes = 2 if d_out <= 2**16 else 4
  out = {
      "dense": d_in * d_out * value_bytes,
      "stored": e * d_in * d_out * value_bytes,
      "csr": kept * (value_bytes + index_bytes) + e * (d_in + 1) * 4,
      "bitmask": kept * value_bytes + -(-e * d_in * d_out // 8),
      "router": 0 if bank.router is None else sum(
          4 * int(np.size(a)) for a in bank.router.values()),
  }
  if n_m is not None:
    out["n_m"] = kept * value_bytes + -(-kept * math.ceil(math.log2(n_m[1])) // 8)
  return out


def single_expert(w: jax.Array, mask: jax.Array | None = None) -> ExpertBank:
  """A single (pruned or dense) matrix as a bank: one expert, no router.

  Args:
    w: [d_in, d_out] weights, zero off-mask.
    mask: [d_in, d_out] 0/1 mask (default all ones: a dense matrix).

  Returns:
    ExpertBank with w, mask: [1, d_in, d_out].
  """
  w = jnp.asarray(w)
  mask = jnp.ones_like(w) if mask is None else jnp.asarray(mask, w.dtype)
  if mask.shape != w.shape:
    raise ValueError(f"mask must have the shape of w {w.shape}, got {mask.shape}")
  return ExpertBank(w[None], mask[None])


@functools.partial(
    jax.jit, static_argnames=("sparsity", "n_m", "block_size", "damp", "batch_size")
)
def _prune_experts_jit(w, hessians, *, sparsity, n_m, block_size, damp, batch_size):
  # sparsegpt_with_info checks its arguments while this traces (static Python values).
  def one(h):
    return sparse.sparsegpt_with_info(
        w, h, sparsity=sparsity, n_m=n_m, block_size=block_size, damp=damp
    )

  return jax.lax.map(one, hessians, batch_size=batch_size)


@functools.partial(
    jax.jit, static_argnames=("mesh", "sparsity", "n_m", "block_size", "damp", "batch_size")
)
def _prune_experts_sharded(w, hessians, *, mesh, **kw):
  # Each `expert` device prunes its E / n experts (a sequential map, as unsharded); the
  # banks stay sharded over `expert`, replicated over the mesh's other axes. No
  # varying-axis check: SparseGPT's damping while_loop starts from replicated constants
  # and carries per-device values, which the check refuses, though nothing crosses devices.
  spec = PartitionSpec(EXPERT_AXIS)
  local = jax.shard_map(lambda w, h: _prune_experts_jit(w, h, **kw), mesh=mesh,
                        in_specs=(PartitionSpec(), spec),
                        out_specs=sparse.SparseGPTResult(spec, spec, spec, spec),
                        check_vma=False)
  return local(w, hessians)


def prune_experts(
    w: jax.Array,
    hessians: jax.Array,
    *,
    sparsity: float = 0.0,
    n_m=None,
    block_size: int = 128,
    damp: float = 0.01,
    expert_batch_size: int = 1,
    mesh: Mesh | None = None,
) -> ExpertBank:
  """K SparseGPT copies of one dense weight, copy e pruned with Hessian e.

  Args:
    w: [d_in, d_out] dense weight.
    hessians: [E, d_in, d_in] per-expert input Hessians (e.g.
      `sparse.hessian_from_inputs(x, ids, num_groups=E)`). An expert whose cluster had no
      tokens has a zero Hessian: every input is dead and its weights are all zero.
    sparsity, n_m, block_size, damp: as in `fpe_jax.sparse.sparsegpt`.
    expert_batch_size: experts pruned together (vmapped) per step of a sequential map;
      1 keeps memory at one expert's, E prunes all at once (fast on accelerators).
    mesh: optional mesh whose `expert` axis (size dividing E) spreads the prunes: each
      device prunes E / n experts; w and mask come back sharded over `expert`.

  Returns:
    ExpertBank with w, mask: [E, d_in, d_out] and no router.

  Raises:
    ValueError: when SparseGPT's damped Cholesky failed for some expert at every damping.
  """
  if jnp.ndim(hessians) != 3 or jnp.shape(hessians)[1:] != (jnp.shape(w)[0],) * 2:
    raise ValueError(
        f"hessians must be [E, d_in, d_in] with d_in={jnp.shape(w)[0]}, got {jnp.shape(hessians)}"
    )
  if not isinstance(expert_batch_size, int) or expert_batch_size < 1:
    raise ValueError(f"expert_batch_size must be a positive int, got {expert_batch_size!r}")
  kw = dict(sparsity=sparse._check_sparsity(sparsity),
            n_m=sparse._check_n_m(n_m, jnp.shape(w)[0]), block_size=block_size,
            damp=float(damp), batch_size=expert_batch_size)
  if mesh is None or mesh.shape.get(EXPERT_AXIS, 1) == 1:
    res = _prune_experts_jit(jnp.asarray(w), jnp.asarray(hessians), **kw)
  else:
    devices = mesh.shape[EXPERT_AXIS]
    if jnp.shape(hessians)[0] % devices:
      raise ValueError(f"hessians: {jnp.shape(hessians)[0]} experts do not split over the "
                       f"mesh's {devices} `expert` devices")
    res = _prune_experts_sharded(jnp.asarray(w), jnp.asarray(hessians), mesh=mesh, **kw)
  failed = np.flatnonzero(~np.asarray(res.ok))
  if failed.size:
    raise ValueError(
        f"hessians: SparseGPT's Cholesky failed at every damping for experts {failed.tolist()}"
    )
  return ExpertBank(res.w, res.mask)


def build_experts(
    w: jax.Array,
    x: jax.Array,
    ids: jax.Array,
    num_experts: int,
    *,
    router: cluster.Router | None = None,
    **prune_kw,
) -> ExpertBank:
  """Expert bank for one linear from its calibration inputs and their routing.

  Args:
    w: [d_in, d_out] dense weight.
    x: [tokens, d_in] calibration inputs of the layer.
    ids: [tokens] int expert of each token (e.g. from `cluster.fit_router`).
    num_experts: E.
    router: the router that gave `ids` (kept in the bank; None: callers pass ids).
    **prune_kw: sparsity, n_m, block_size, damp, expert_batch_size (see `prune_experts`).

  Returns:
    ExpertBank with w, mask: [E, d_in, d_out] and `router`.
  """
  hessians = sparse.hessian_from_inputs(x, ids, num_groups=num_experts)
  return prune_experts(w, hessians, **prune_kw)._replace(router=router)


def expand_linear(
    key: jax.Array,
    w: jax.Array,
    x: jax.Array,
    num_experts: int,
    *,
    n_components: int | None = None,
    n_restarts: int = 10,
    max_iters: int = 100,
    **prune_kw,
) -> tuple[ExpertBank, jax.Array]:
  """Sparse Expansion of one linear: router fitted on `x`, then one SparseGPT expert each.

  Args:
    key: PRNG key (k-means seeding).
    w: [d_in, d_out] dense weight.
    x: [tokens, d_in] calibration inputs.
    num_experts: K (at most the number of tokens).
    n_components, n_restarts, max_iters: see `cluster.fit_router`.
    **prune_kw: see `prune_experts`.

  Returns:
    (bank, ids): the ExpertBank (router, w and mask: [K, d_in, d_out]); ids: [tokens] int32
    the calibration tokens' experts.
  """
  router, ids = cluster.fit_router(
      key, x, num_experts, n_components=n_components, n_restarts=n_restarts,
      max_iters=max_iters,
  )
  return build_experts(w, x, ids, num_experts, router=router, **prune_kw), ids


def with_block_mask(bank: ExpertBank, **block_kw) -> ExpertBank:
  """The bank with its masks' host-built block metadata, for the Pallas expert matmul.

  Args:
    bank: an ExpertBank (its masks are read back to the host once).
    **block_kw: `BlockSparseMask.from_masks` options (e.g. block_shape).
  """
  return bank._replace(block_mask=BlockSparseMask.from_masks(np.asarray(bank.mask), **block_kw))


def route(bank: ExpertBank, x: jax.Array) -> jax.Array:
  """[...] int32 expert of each token of `x: [..., d_in]` (all 0 for a one-expert bank).

  Jit-able. A bank of several experts without a router cannot route: pass its ids.
  """
  if bank.router is not None:
    return cluster.route(bank.router, x)
  if bank.num_experts != 1:
    raise ValueError(f"bank: {bank.num_experts} experts and no router; pass ids")
  return jnp.zeros(jnp.shape(x)[:-1], jnp.int32)


def _apply_xla(w, x, ids):
  num_experts = w.shape[0]
  order = jnp.argsort(ids, stable=True)
  sizes = jnp.bincount(ids, length=num_experts).astype(jnp.int32)
  y_sorted = jax.lax.ragged_dot(x[order], w, sizes)
  return jnp.zeros_like(y_sorted).at[order].set(y_sorted)


def _apply_tiled(w, x, ids, tile_size):
  num_tokens, d_in = x.shape
  num_experts = w.shape[0]
  sizes = jnp.bincount(ids, length=num_experts)
  tiles_per_expert = (sizes + tile_size - 1) // tile_size
  tile_end = jnp.cumsum(tiles_per_expert)
  tile_start = tile_end - tiles_per_expert
  # Static bound: sum_e ceil(n_e / tile) <= ceil(T / tile) + E.
  num_tiles = -(-num_tokens // tile_size) + num_experts
  order = jnp.argsort(ids, stable=True)
  ids_sorted = ids[order]
  rank_in_group = jnp.arange(num_tokens) - (jnp.cumsum(sizes) - sizes)[ids_sorted]
  slot = tile_start[ids_sorted] * tile_size + rank_in_group
  x_tiles = jnp.zeros((num_tiles * tile_size, d_in), x.dtype).at[slot].set(x[order])
  # Unused tiles at the end hold zero rows; any valid expert index will do for them.
  tile_expert = jnp.minimum(
      jnp.searchsorted(tile_end, jnp.arange(num_tiles), side="right"), num_experts - 1
  )
  y_tiles = jax.lax.map(
      lambda a: a[0] @ w[a[1]], (x_tiles.reshape(num_tiles, tile_size, d_in), tile_expert)
  )
  y_sorted = y_tiles.reshape(-1, w.shape[2])[slot]
  return jnp.zeros_like(y_sorted).at[order].set(y_sorted)


def _apply_onehot(w, x, ids):
  y_all = jnp.einsum("ti,eio->teo", x, w)
  return jnp.take_along_axis(y_all, ids[:, None, None], axis=1)[:, 0]


def apply_experts(
    w: jax.Array,
    x: jax.Array,
    ids: jax.Array,
    *,
    implementation: implementations.Implementation = "auto",
    block_mask: BlockSparseMask | None = None,
    xla_strategy: str | None = None,
    tile_size: int = 128,
) -> jax.Array:
  """y_t = x_t @ w[ids_t]: each token through its own expert.

  Args:
    w: [E, d_in, d_out] expert weights (zero off-mask).
    x: [..., d_in] inputs.
    ids: [...] int expert of each token, in [0, E).
    implementation: one of kernels_pallas.implementations.IMPLEMENTATIONS (see the module
      docstring).
    block_mask: `kernels_pallas.block_sparse.BlockSparseMask.from_masks(masks)` built once
      on the host from the [E, d_in, d_out] masks; needed by "pallas".
    xla_strategy: how the XLA path multiplies, one of XLA_STRATEGIES; None: "tiled" on
      CPU, "ragged_dot" elsewhere.
    tile_size: rows per tile for "tiled".

  Returns:
    [..., d_out].
  """
  implementation = implementations.resolve_implementation(
      implementation, has_kernel_mask=block_mask is not None, mask_name="block_mask")
  if xla_strategy is not None and xla_strategy not in XLA_STRATEGIES:
    raise ValueError(f"xla_strategy must be None or one of {XLA_STRATEGIES}, got "
                     f"{xla_strategy!r}")
  if jnp.ndim(w) != 3 or jnp.shape(x)[-1] != jnp.shape(w)[1]:
    raise ValueError(f"w must be [E, d_in, d_out] matching x [..., d_in]; got w "
                     f"{jnp.shape(w)}, x {jnp.shape(x)}")
  if jnp.shape(ids) != jnp.shape(x)[:-1]:
    raise ValueError(f"ids must have shape {jnp.shape(x)[:-1]} (x without d_in), got "
                     f"{jnp.shape(ids)}")
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])
  ids2 = ids.reshape(-1).astype(jnp.int32)
  if implementation == "pallas":
    # premasked: w is zero off-mask (as every path here assumes), so the kernel skips the
    # element-mask multiply in its inner loop.
    y = expert_matmul(x2, ids2, w, block_mask, implementation="pallas", premasked=True)
    return y.reshape(*lead, w.shape[-1])
  if xla_strategy is None:
    xla_strategy = "tiled" if jax.default_backend() == "cpu" else "ragged_dot"
  if xla_strategy == "tiled":
    if not isinstance(tile_size, int) or tile_size < 1:
      raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
    y = _apply_tiled(w, x2, ids2, tile_size)
  elif xla_strategy == "ragged_dot":
    y = _apply_xla(w, x2, ids2)
  else:
    y = _apply_onehot(w, x2, ids2)
  return y.reshape(*lead, w.shape[-1])


def apply_expert_linear(bank: ExpertBank, x: jax.Array, ids: jax.Array | None = None,
                        **apply_kw) -> jax.Array:
  """Applies a bank: each token of `x: [..., d_in]` through its expert -> [..., d_out].

  Args:
    bank: an ExpertBank; one expert is a plain `x @ w[0]` (no routing).
    x: [..., d_in] inputs.
    ids: optional [...] int experts (default: `route(bank, x)`); pass them for banks that
      share another bank's router, so the tokens are routed once.
    **apply_kw: `apply_experts` options (implementation, tile_size); the bank's own
      `block_mask` is passed along.

  Returns:
    [..., d_out].
  """
  if bank.num_experts == 1:
    return x @ bank.w[0]
  ids = route(bank, x) if ids is None else ids
  return apply_experts(bank.w, x, ids, block_mask=bank.block_mask, **apply_kw)


def expert_shardings(tree, mesh: Mesh):
  """NamedShardings for a tree holding expert banks: w / mask leaves over `expert`.

  For placing compressed FFNs expert-parallel (`shard_experts`, or as jit's shardings).

  Args:
    tree: any pytree holding ExpertBanks (e.g. `{"w_gate": bank, ...}`).
    mesh: a mesh with an `expert` axis.

  Returns:
    The tree's structure with a NamedSharding per leaf (EXPERT_BANK_RULES; the rest
    replicated).
  """
  return sharding.tree_shardings(tree, mesh, EXPERT_BANK_RULES)


def shard_experts(tree, mesh: Mesh):
  """Places a tree holding expert banks on `mesh` (experts over `expert`, rest replicated).

  For expert-parallel Sparse Expansion: each device then holds E / n experts' weights and
  masks, as `apply_experts_sharded` expects.
  """
  return jax.device_put(tree, expert_shardings(tree, mesh))


def apply_experts_sharded(mesh: Mesh, w: jax.Array, x: jax.Array, ids: jax.Array) -> jax.Array:
  """Expert-parallel `apply_experts`: w sharded [E, ...] over `expert`, tokens replicated.

  For a compressed model whose experts do not fit, or are too slow, on one device; the
  numbers are `apply_experts`' up to float order.

  Each device sorts the tokens routed to its E / n local experts to the front, runs one
  grouped matmul over them (other tokens fall past the groups and give zero rows), and a
  psum over `expert` adds the devices' disjoint contributions.

  Args:
    mesh: a mesh with an `expert` axis whose size divides E.
    w: [E, d_in, d_out].
    x: [T, d_in].
    ids: [T] int.

  Returns:
    [T, d_out], replicated.
  """
  if EXPERT_AXIS not in mesh.axis_names:
    raise ValueError(f"mesh needs an {EXPERT_AXIS!r} axis, has {mesh.axis_names}")
  n_shards = mesh.shape[EXPERT_AXIS]
  if w.shape[0] % n_shards:
    raise ValueError(f"w: {w.shape[0]} experts do not split over {n_shards} `expert` devices")

  def local(w_local, x, ids):
    num_local = w_local.shape[0]
    offset = jax.lax.axis_index(EXPERT_AXIS) * num_local
    local_ids = ids - offset
    mine = (local_ids >= 0) & (local_ids < num_local)
    order = jnp.argsort(jnp.where(mine, local_ids, num_local), stable=True)
    sizes = jnp.bincount(jnp.where(mine, local_ids, num_local), length=num_local + 1)
    y_sorted = jax.lax.ragged_dot(x[order], w_local, sizes[:num_local].astype(jnp.int32))
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted)
    y = jnp.where(mine[:, None], y, 0.0)
    return jax.lax.psum(y, EXPERT_AXIS)

  fn = jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(expert_partition_spec(), PartitionSpec(), PartitionSpec()),
      out_specs=PartitionSpec(),
  )
  return fn(w, x, ids.astype(jnp.int32))


def expert_weighted_wasserstein(w: jax.Array, x: jax.Array, ids: jax.Array) -> np.ndarray:
  """Per-neuron Wasserstein distance to a Gaussian of a routed layer, weighted by expert load.

  WD_j = sum_e (n_e / n) WD_j(x_e @ w[e]): expert e's outputs on the n_e tokens routed to
  it, over experts with at least two tokens (n counts those tokens); WD is
  `metrics.wasserstein_to_gaussian`. Runs on the host, op by op (clusters are ragged).

  Args:
    w: [E, d_in, d_out] expert weights (`bank.w`; the dense weight broadcast to [E, ...]
      gives the dense layer's WD within each cluster).
    x: [tokens, d_in] inputs of the layer.
    ids: [tokens] int expert of each token.

  Returns:
    [d_out] float64.
  """
  w, x = jnp.asarray(w), jnp.asarray(x)
  ids = np.asarray(ids).reshape(-1)
  if w.ndim != 3 or x.ndim != 2 or x.shape[1] != w.shape[1]:
    raise ValueError(f"w must be [E, d_in, d_out] and x [tokens, d_in]; got w {w.shape}, "
                     f"x {x.shape}")
  if ids.shape[0] != x.shape[0]:
    raise ValueError(f"ids: {ids.shape[0]} ids for {x.shape[0]} tokens")
  total, weight = np.zeros(w.shape[-1], np.float64), 0
  for e in range(w.shape[0]):
    rows = np.flatnonzero(ids == e)
    if rows.size < 2:
      continue
    # n_e * WD_e in float32 (the WD's dtype), summed in float64.
    total += rows.size * np.asarray(metrics.wasserstein_to_gaussian(x[rows] @ w[e]))
    weight += rows.size
  if weight == 0:
    raise ValueError("ids: no expert has two or more tokens")
  return total / weight
