"""fpe_jax: disentangling neural representations in JAX, as pure functions over pytrees."""
from fpe_jax import cluster, experts, sparse  # noqa: F401  (paper 2: pruning, routing, experts)
