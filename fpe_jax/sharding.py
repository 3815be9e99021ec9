"""Device meshes and partition rules. Axis names: `data` (batch), `member`, `expert`.

Sharding rules are data, as in big_vision: a list of (regex over the '/'-joined
parameter path, PartitionSpec); the first match wins, unmatched leaves are replicated.
"""

import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "member", "expert")

# Stacked ensembles carry their member axis first (architecture.md). Expert banks' rules
# are fpe_jax.experts.EXPERT_BANK_RULES (their w / mask fields only).
MEMBER_RULES = ((r".*", PartitionSpec("member")),)


def make_mesh(axis_sizes: dict[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all); by default every device on the `data` axis.

  Args:
    axis_sizes: e.g. `{"data": 4, "member": 2}`; the product must equal the device count.
    devices: the devices to use.
  """
  devices = list(jax.devices() if devices is None else devices)
  axis_sizes = {"data": len(devices)} if axis_sizes is None else dict(axis_sizes)
  unknown = set(axis_sizes) - set(AXES)
  if unknown:
    raise ValueError(f"mesh axes must be among {AXES}, got {sorted(unknown)}")
  if int(np.prod(list(axis_sizes.values()))) != len(devices):
    raise ValueError(f"mesh axis sizes {axis_sizes} do not multiply to {len(devices)} devices")
  grid = np.asarray(devices, dtype=object).reshape(tuple(axis_sizes.values()))
  return Mesh(grid, tuple(axis_sizes))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis over `data`, the rest replicated, for an array of rank `ndim`."""
  return NamedSharding(mesh, PartitionSpec("data", *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def tree_shardings(tree, mesh: Mesh, rules: Sequence[tuple[str, PartitionSpec]]):
  """A NamedSharding per leaf of `tree`, from the first rule whose regex matches its path."""

  def pick(path, leaf):
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    for pattern, spec in rules:
      if re.fullmatch(pattern, name):
        return NamedSharding(mesh, spec if np.ndim(leaf) >= len(spec) else PartitionSpec())
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree_util.tree_map_with_path(pick, tree)


def shard_tree(tree, mesh: Mesh, rules: Sequence[tuple[str, PartitionSpec]]):
  """Places `tree` on `mesh` by `rules` (see `tree_shardings`)."""
  return jax.device_put(tree, tree_shardings(tree, mesh, rules))
