"""fpe_jax: disentangling neural representations in JAX, as pure functions over pytrees."""
