"""Block-sparse masked matmul `x @ (w * mask)` over a fixed mask, skipping empty blocks.

`BlockSparseMask` is the mask's host-built block metadata (data only);
`block_sparse_matmul(x, w, mask, implementation=...)` multiplies by it; `grouped` holds
the kernel calls on grouped rows that `kernels_pallas.expert_matmul` shares. The names
`implementation=` takes are kernels_pallas.implementations.IMPLEMENTATIONS.
"""

from kernels_pallas.block_sparse.grouped import KernelConfig, kernel_config
from kernels_pallas.block_sparse.metadata import BlockMetadata, BlockSparseMask, block_density
from kernels_pallas.block_sparse.ops import block_sparse_matmul, stacked_matmul
from kernels_pallas.block_sparse.reference import masked_matmul_reference

__all__ = ["BlockMetadata", "BlockSparseMask", "KernelConfig", "block_density",
           "block_sparse_matmul", "kernel_config", "masked_matmul_reference", "stacked_matmul"]
