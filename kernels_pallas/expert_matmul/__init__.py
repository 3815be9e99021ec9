"""Routed sparse-expert matmul (Sparse Expansion): tokens times their expert's masked weight."""

from kernels_pallas.expert_matmul.ops import expert_matmul
from kernels_pallas.expert_matmul.reference import expert_matmul_reference

__all__ = ["expert_matmul", "expert_matmul_reference"]
