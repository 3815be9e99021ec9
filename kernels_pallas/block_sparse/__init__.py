"""Block-sparse masked matmul `x @ (w * mask)` over a fixed mask, skipping empty blocks."""

from kernels_pallas.block_sparse.metadata import IMPLEMENTATIONS, BlockSparseMask
from kernels_pallas.block_sparse.ops import block_sparse_matmul, resolve_implementation
from kernels_pallas.block_sparse.reference import masked_matmul_reference

__all__ = ["IMPLEMENTATIONS", "BlockSparseMask", "block_sparse_matmul", "masked_matmul_reference",
           "resolve_implementation"]
