"""One-hot reference for the routed expert matmul: every expert on every token, then select."""

from __future__ import annotations

from typing import Annotated

import jax
import jax.numpy as jnp


def expert_matmul_reference(x: Annotated[jax.Array, "t k"], expert_ids: Annotated[jax.Array, "t"],
                            w: Annotated[jax.Array, "e k n"],
                            dense_masks: Annotated[jax.Array, "e k n"]
                            ) -> Annotated[jax.Array, "t n"]:
  """y[t] = x[t] @ (w[e_t] * mask[e_t]), computed for all experts and picked by one-hot.

  Args:
    x: [T, K] tokens.
    expert_ids: [T] int expert of each token, in [0, E).
    w: [E, K, N] expert weights.
    dense_masks: [E, K, N] 0/1 masks.

  Returns:
    [T, N]. Costs E times the routed work: a test reference, not a fast path.
  """
  all_experts = jnp.einsum("tk,ekn->etn", x, w * dense_masks.astype(w.dtype))
  one_hot = jax.nn.one_hot(expert_ids, w.shape[0], dtype=all_experts.dtype)  # [T, E]
  return jnp.einsum("te,etn->tn", one_hot, all_experts)
