"""fpe_jax: disentangling neural representations in JAX, as pure functions over pytrees.

Paper 1 (FPE): `nn`, `fpe`, `metrics`, `tasks.boolean`.
Paper 2 (Sparse Expansion, Wasserstein neurons): `sparse`, `cluster`, `experts`,
`sparse_expansion`, `metrics.wasserstein_to_gaussian`, `models.llama`.
Paper 3 (NCEn): `ensemble`, `attacks`, `models.cnn`.
Shared: `train` (the one training core: TrainState, optimisers, loss functions, the scanned
chunk; every binary that trains goes through it, FPE's and NCEn's), `sharding` (meshes),
`checkpoint` (orbax), `data` (packaged data loaders), and `flax_interop` (FPE on Flax NNX /
linen models; not imported here, so `import fpe_jax` does not import Flax:
`from fpe_jax import flax_interop`).
"""

from fpe_jax import (  # noqa: F401
    attacks,
    checkpoint,
    cluster,
    ensemble,
    experts,
    fpe,
    metrics,
    nn,
    sharding,
    sparse,
    sparse_expansion,
    train,
)
from fpe_jax.tasks import boolean  # noqa: F401
