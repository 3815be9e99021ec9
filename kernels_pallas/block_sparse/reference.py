"""The jnp reference (and the "xla" implementation): a dense matmul with the mask applied."""

from __future__ import annotations

from typing import Annotated

import jax


def masked_matmul_reference(x: Annotated[jax.Array, "*batch k"], w: Annotated[jax.Array, "k n"],
                            dense_mask: Annotated[jax.Array, "k n"]
                            ) -> Annotated[jax.Array, "*batch n"]:
  """`x @ (w * dense_mask)`; x: [..., K], w: [K, N], dense_mask: [K, N] -> [..., N].

  Autodiff gives dx = dy @ (w * mask).T and dw = (x.T @ dy) * mask, the weight gradient
  restricted to the mask's support, which is what the kernel's VJP reproduces.
  """
  return x @ (w * dense_mask.astype(w.dtype))
