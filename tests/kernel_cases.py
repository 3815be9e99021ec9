"""The kernel configurations the lowering and compile tests share (tests/test_kernels_lowering.py,
tests/test_kernels_compile.py, tests/compile_for_h200.py): both ops at the default
128x128 blocks, on a small square, kernels_pallas.bench's 1024x4096x4096 and SmolLM2's
8-expert 576x1536."""

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.block_sparse import BlockSparseMask, block_sparse_matmul
from kernels_pallas.expert_matmul import expert_matmul


def block_mask(k, n, density, seed=0, block=128):
  """[k, n] 0/1 mask whose 128x128 blocks are full or empty, `density` of them full (the
  last row- or column-block is partial when k or n is not a multiple of 128)."""
  rng = np.random.default_rng(seed)
  blocks = rng.random((-(-k // block), -(-n // block))) < density
  blocks[0, :] = True  # every column-block keeps one block
  return np.kron(blocks, np.ones((block, block)))[:k, :n].astype(np.float32)


def _square(rows, k, n, density):
  bsm = BlockSparseMask.from_mask(block_mask(k, n, density))
  def op(impl, premasked=False):
    return lambda x, w: block_sparse_matmul(x, w, bsm, implementation=impl, premasked=premasked)
  return op, ((rows, k), (k, n))


def _experts(tokens, num_experts, k, n, density):
  masks = np.stack([block_mask(k, n, density, seed) for seed in range(num_experts)])
  bsm = BlockSparseMask.from_masks(masks)
  ids = jnp.asarray(np.random.default_rng(1).integers(0, num_experts, tokens), jnp.int32)
  def op(impl, premasked=False):
    return lambda x, w: expert_matmul(x, ids, w, bsm, implementation=impl, premasked=premasked)
  return op, ((tokens, k), (num_experts, k, n))


# name -> () -> ((implementation, premasked=False) -> fn(x, w), (x shape, w shape))
CASES = {
    "square_small": lambda: _square(256, 512, 384, 0.5),
    "square_bench": lambda: _square(1024, 4096, 4096, 0.25),
    "experts_smollm2": lambda: _experts(1024, 8, 576, 1536, 0.5),
}


def kernel_calls(text: str) -> dict[str, int]:
  """The Pallas kernels' custom calls in lowered (StableHLO) or compiled (HLO) text, by
  compiler: Mosaic TPU, Pallas Triton and Mosaic GPU (`mosaic_gpu_v2`)."""
  return {"tpu": text.count("tpu_custom_call"), "triton": text.count("__gpu$xla.gpu.triton"),
          "mosaic_gpu": len(re.findall(r'(?:@|custom_call_target=")mosaic_gpu', text))}


def runs_mosaic_gpu(dtype, premasked: bool) -> bool:
  """Whether the GPU forward and input gradient are Mosaic GPU kernels, written out from
  kernel_mosaic_gpu's rules for these cases' 128x128 blocks and 128-row tiles: jax >=
  0.11, premasked weights, 16-bit inputs (the weight gradient is always Triton's)."""
  return jax.__version_info__[:2] >= (0, 11) and premasked and jnp.dtype(dtype).itemsize == 2


def grad_of_sum(fn):
  """(dx, dw) of sum(fn(x, w)): the input- and weight-gradient kernels."""
  return jax.grad(lambda x, w: fn(x, w).astype(jnp.float32).sum(), argnums=(0, 1))


def targeting_gpu(platform: str, device_kind: str = "NVIDIA H200",
                  num_cores: int | None = 132):
  """The context to trace and lower in for `platform`. From jax 0.11, Pallas Triton takes
  the target GPU from the default device or, when that is a CPU (a deviceless compile),
  from the abstract mesh's device, so a CUDA lowering must name one; others need none.
  `platform`: a lowering platform, or a (compile-only) device's platform ("gpu")."""
  if platform not in ("cuda", "gpu"):
    return contextlib.nullcontext()
  gpu = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=num_cores,
                                    platform="cuda")
  return jax.sharding.use_abstract_mesh(
      jax.sharding.AbstractMesh((1,), ("device",), axis_types=(jax.sharding.AxisType.Auto,),
                                abstract_device=gpu))
