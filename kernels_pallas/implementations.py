"""The one vocabulary of matmul implementations: kernels, fpe_jax and the binaries' flags.

Every function that can multiply through a Pallas kernel takes `implementation=`, one of
IMPLEMENTATIONS, and it means the same everywhere (`block_sparse_matmul`,
`expert_matmul`, `fpe_jax.nn.apply_mlp`, `fpe_jax.experts.apply_experts`, `--matmul`):

  "xla"     XLA ops on the masked weights: `x @ (w * mask)`, or for routed experts a
            grouped XLA matmul. Never a Pallas kernel; the default path's numbers.
  "pallas"  the block-sparse Pallas kernel of the platform (Mosaic on TPU; on GPU
            Triton, and from jax 0.11 Mosaic GPU for premasked 16-bit weights; on CPU the
            TPU kernel in interpret mode, slow, for checking). It needs the
            mask's kernel metadata, a `block_sparse.BlockSparseMask` built once on the
            host; asking for it without one is an error.
  "auto"    "pallas" where the platform has a native kernel (TPU, GPU) and the caller
            passed a BlockSparseMask; "xla" otherwise, so always "xla" on CPU. A caller
            builds kernel metadata only where it means to use the kernel, so "auto" never
            fails for lack of it.

Which platform: the kernel ops (`block_sparse_matmul`, `expert_matmul`) choose when the
computation is LOWERED (`block_sparse.grouped.on_lowering_platform`), so an ahead-of-time
lowering for a TPU or an H200 from a CPU host holds the real kernel. Host-side decisions
made before tracing (whether to build kernel metadata at all; `nn` and `experts` picking
a path for "auto") read `jax.default_backend()` here: `native_backend` and
`resolve_implementation`. `backend=` (one of PALLAS_BACKENDS, with "pallas" only) forces
one kernel family, chosen when traced, e.g. the GPU kernel in interpret mode on CPU.
"""

from __future__ import annotations

from typing import Literal

import jax

IMPLEMENTATIONS = ("auto", "xla", "pallas")
PALLAS_BACKENDS = ("tpu", "gpu")
Implementation = Literal["auto", "xla", "pallas"]
PallasBackend = Literal["tpu", "gpu"]

_NATIVE = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}


def check_implementation(implementation: str, backend: str | None = None) -> str:
  """Returns `implementation` if valid (and `backend` with it), else a one-line ValueError."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if backend is not None:
    if backend not in PALLAS_BACKENDS:
      raise ValueError(f"backend must be None or one of {PALLAS_BACKENDS}, got {backend!r}")
    if implementation != "pallas":
      raise ValueError(f"backend={backend!r} needs implementation='pallas', got "
                       f"{implementation!r}")
  return implementation


def native_backend() -> str | None:
  """The Pallas kernel family native to the platform ("tpu" | "gpu"), None on CPU."""
  return _NATIVE.get(jax.default_backend())


def resolve_implementation(implementation: str, *, has_kernel_mask: bool = True,
                           mask_name: str = "mask") -> str:
  """What `implementation` runs here: "xla" or "pallas".

  Args:
    implementation: one of IMPLEMENTATIONS.
    has_kernel_mask: whether the caller holds a BlockSparseMask for the weight.
    mask_name: the caller's argument that would hold it (named in the error).

  Returns:
    "xla" or "pallas" (see the module docstring for "auto").

  Raises:
    ValueError: for an unknown name, or "pallas" without a kernel mask.
  """
  check_implementation(implementation)
  if implementation == "auto":
    return "pallas" if has_kernel_mask and native_backend() is not None else "xla"
  if implementation == "pallas" and not has_kernel_mask:
    raise ValueError(f"implementation='pallas' needs {mask_name} to be a "
                     "kernels_pallas.block_sparse.BlockSparseMask (built once on the host "
                     "with BlockSparseMask.from_mask / from_masks), got a dense mask")
  return implementation
