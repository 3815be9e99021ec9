"""Sparse Expansion pipeline: block-by-block compression on a small random Llama (the
mechanics), routed experts against a per-token reference, and bad input of the binaries.

Compilation dominates these tests' time, so they share shapes: every pipeline call uses
BATCH (3 windows: 8 calibration windows make batches 3, 3, 2 and 4 held-out ones 3, 1,
so partial batches are covered), both expert routers project to the same PCA size, and XLA's
optimisation passes are off for this module (the model is tiny: compiling is the cost)."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from fpe_jax import experts, sharding, sparse
from fpe_jax import sparse_expansion as se
from fpe_jax.metrics import wasserstein_to_gaussian
from fpe_jax.models import llama
from kernels_pallas.block_sparse import BlockSparseMask

BATCH = 3
CFG = llama.LlamaConfig(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        d_ff=128, rope_base=1e4)


def _params(key):
  keys = iter(jax.random.split(key, 16))
  shapes = {"wq": (64, 64), "wk": (64, 32), "wv": (64, 32), "wo": (64, 64),
            "w_gate": (64, 128), "w_up": (64, 128), "w_down": (128, 64)}
  blocks = {k: jax.random.normal(next(keys), (2, *s)) / np.sqrt(s[0]) for k, s in shapes.items()}
  blocks["attn_norm"] = 1 + 0.1 * jax.random.normal(next(keys), (2, 64))
  blocks["ffn_norm"] = 1 + 0.1 * jax.random.normal(next(keys), (2, 64))
  return {"embed": jax.random.normal(next(keys), (96, 64)), "final_norm": jnp.ones(64),
          "blocks": blocks}


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
  # Restored after this module: other test files keep XLA's default optimisations.
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module")
def setup():
  params = _params(jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (12, 16), 0, 96)
  return params, tokens[:8], tokens[8:]


def test_dense_pipeline_matches_full_forward(setup):
  params, calib, held_out = setup
  result = se.run_pipeline(jax.random.key(0), CFG, params, calib, held_out,
                           se.CompressionConfig(method="dense"), batch_size=BATCH)
  np.testing.assert_allclose(result.perplexity, llama.perplexity(CFG, params, held_out),
                             rtol=1e-5)


def test_sequential_calibration_sees_compressed_earlier_blocks(setup):
  params, calib, held_out = setup
  cfg = se.CompressionConfig(method="sparsegpt", sparsity=0.5)
  seen = {}
  ffns = {}

  def hook(layer, block, x, ffn, info):
    seen[layer], ffns[layer] = np.asarray(x), ffn
    return {"layer": layer}

  result = se.run_pipeline(jax.random.key(0), CFG, params, calib, held_out, cfg,
                           batch_size=BATCH, layer_hook=hook)
  assert [r["layer"] for r in result.layers] == [0, 1]
  # Block 1's calibration input is block 0 with ITS COMPRESSED FFN.
  b0, b1 = llama.block_params(params, 0), llama.block_params(params, 1)
  # Jitted only because op-by-op dispatch of the attention costs seconds here.
  attention = jax.jit(llama.attention_sublayer, static_argnums=0)
  h = attention(CFG, b0, llama.embed(params, calib))
  h = h + se.ffn_apply(ffns[0], llama.ffn_input(CFG, b0, h))
  x1 = llama.ffn_input(CFG, b1, attention(CFG, b1, h))
  np.testing.assert_allclose(seen[1], np.asarray(x1).reshape(-1, 64), rtol=1e-4, atol=1e-5)
  # Block 0's FFN is SparseGPT on the Hessian of its calibration inputs.
  want, _ = sparse.sparsegpt(b0["w_gate"], sparse.hessian_from_inputs(seen[0]), sparsity=0.5)
  np.testing.assert_allclose(ffns[0]["w_gate"].w[0], want, rtol=1e-5, atol=1e-6)
  # Held-out perplexity = a full forward with the compressed weights substituted.
  pruned = jax.tree.map(lambda a: a, params)
  for name in se.FFN_MATRICES:
    pruned["blocks"][name] = jnp.stack([ffns[i][name].w[0] for i in range(2)])
  np.testing.assert_allclose(result.perplexity, llama.perplexity(CFG, pruned, held_out),
                             rtol=1e-4)


def test_the_kept_model_reproduces_the_run_and_generates_like_the_dense_forward(setup):
  """keep_ffns: the compressed FFNs (the model) come back beside the perplexity, and
  evaluating them again gives the run's perplexity exactly. With no compressed layer, the
  padded greedy decoder continues a prompt as llama.greedy_decode does."""
  params, calib, held_out = setup
  cfg = se.CompressionConfig(method="sparse_expansion", sparsity=0.5, num_experts=2,
                             kmeans_restarts=1, kmeans_iters=3)
  result = se.run_pipeline(jax.random.key(0), CFG, params, calib, held_out, cfg,
                           layers=[1], batch_size=BATCH, keep_ffns=True)
  assert sorted(result.ffns) == [1] and result.ffns[1]["w_gate"].num_experts == 2
  assert all(bank.block_mask is None for bank in result.ffns[1].values())
  again = se.compressed_perplexity(CFG, params, result.ffns, held_out, batch_size=BATCH)
  assert again == (result.perplexity, result.mean_nll)
  assert se.run_pipeline(jax.random.key(0), CFG, params, calib, held_out, cfg, layers=[1],
                         batch_size=BATCH).ffns is None
  prompt = np.asarray(held_out[0, :5])
  np.testing.assert_array_equal(se.compressed_greedy(CFG, params, {}, prompt, 4),
                                llama.greedy_decode(CFG, params, prompt, 4))
  # The compressed model's own continuation: 4 tokens of the vocabulary.
  tokens = se.compressed_greedy(CFG, params, result.ffns, prompt, 4)
  assert len(tokens) == 4 and all(0 <= t < CFG.vocab_size for t in tokens)


def test_a_run_resumed_from_any_block_state_ends_exactly_as_an_uninterrupted_one(setup):
  """on_block's state after block i, given back as `resume`, continues at block i + 1: the
  same perplexity, layer records and kept FFNs as a run that never stopped, and the
  finished blocks are not compressed again (the hook sees only the remaining ones)."""
  params, calib, held_out = setup
  cfg = se.CompressionConfig(method="sparse_expansion", sparsity=0.5, num_experts=2,
                             kmeans_restarts=1, kmeans_iters=3)
  states, seen = [], []

  def hook(layer, block, x, ffn, info):
    seen.append(layer)
    return {"layer": layer}

  kw = dict(batch_size=BATCH, keep_ffns=True, layer_hook=hook)
  want = se.run_pipeline(jax.random.key(0), CFG, params, calib, held_out, cfg,
                         on_block=states.append, **kw)
  assert [s.blocks_done for s in states] == [1, 2] and states[-1].h_cal is None
  for state in states:
    seen.clear()
    # As a checkpoint would give it back: host arrays.
    state = dataclasses.replace(state, h_cal=None if state.h_cal is None else
                                np.asarray(state.h_cal), h_eval=np.asarray(state.h_eval))
    got = se.run_pipeline(jax.random.key(1), CFG, params, calib, held_out, cfg,
                          resume=state, **kw)
    assert seen == [0, 1][state.blocks_done:]
    assert (got.perplexity, got.mean_nll, got.layers) == (
        want.perplexity, want.mean_nll, want.layers)
    jax.tree.map(np.testing.assert_array_equal, got.ffns, want.ffns)
  with pytest.raises(ValueError, match="resume"):
    se.run_pipeline(jax.random.key(0), CFG, params, calib, held_out, cfg, batch_size=BATCH,
                    resume=states[0])  # a state with FFNs, for a run that keeps none


def test_calibration_sharded_over_8_devices_gives_the_one_device_model(setup):
  """Tokens split over `data` (4) and the K=2 expert prunes over `expert` (2): the same
  masks and, up to float order, the same perplexity (measured: equal to the bit here;
  stated tolerance 1e-4 relative). The experts come back sharded over `expert`."""
  params, calib, held_out = setup
  cfg = se.CompressionConfig(method="sparse_expansion", sparsity=0.5, num_experts=2,
                             kmeans_restarts=1, kmeans_iters=3)
  kw = dict(layers=[1], batch_size=BATCH, keep_ffns=True)
  one = se.run_pipeline(jax.random.key(0), CFG, params, calib, held_out, cfg, **kw)
  mesh = sharding.make_mesh({"data": 4, "expert": 2})
  eight = se.run_pipeline(jax.random.key(0), CFG, params, calib, held_out, cfg, mesh=mesh, **kw)
  np.testing.assert_allclose(eight.perplexity, one.perplexity, rtol=1e-4)
  for name in se.FFN_MATRICES:
    np.testing.assert_array_equal(eight.ffns[1][name].mask, one.ffns[1][name].mask)
    assert eight.ffns[1][name].w.sharding.spec == PartitionSpec("expert")
  with pytest.raises(ValueError, match="65 calibration tokens do not split over its 8"):
    se.run_pipeline(jax.random.key(0), CFG, params, calib[:5, :13], held_out, cfg,
                    mesh=sharding.make_mesh({"data": 8}), **kw)
  with pytest.raises(ValueError, match="num_experts=2 does not split over its 8"):
    se.run_pipeline(jax.random.key(0), CFG, params, calib, held_out, cfg,
                    mesh=sharding.make_mesh({"expert": 8}), **kw)


def test_expert_ffn_matches_per_token_reference(setup):
  params, calib, _ = setup
  block = llama.block_params(params, 0)
  x = jax.random.normal(jax.random.key(2), (128, 64))
  # pca_components=4 for both routers (inputs 64 and 128 wide): one k-means compilation.
  cfg = se.CompressionConfig(method="sparse_expansion", sparsity=0.5, num_experts=3,
                             pca_components=4, kmeans_restarts=2, kmeans_iters=10)
  ffn, info = se.compress_ffn_experts(jax.random.key(3), block, x, cfg)
  assert ffn["w_gate"].w.shape == (3, 64, 128) and ffn["w_down"].w.shape == (3, 128, 64)
  assert ffn["w_gate"].mask.shape == (3, 64, 128)
  assert ffn["w_up"].router is ffn["w_gate"].router  # gate and up share one router
  ids_in = np.asarray(info["ids_in"])
  # Routing the calibration tokens reproduces their k-means clusters.
  np.testing.assert_array_equal(np.asarray(experts.route(ffn["w_gate"], x)), ids_in)
  w = jax.tree.map(np.asarray, ffn)
  xn = np.asarray(x, np.float64)
  rows = np.arange(128)
  g = np.einsum("td,tdf->tf", xn, w["w_gate"].w[ids_in])
  u = np.einsum("td,tdf->tf", xn, w["w_up"].w[ids_in])
  inter = g / (1 + np.exp(-g)) * u
  ids_mid = np.asarray(experts.route(ffn["w_down"], jnp.asarray(inter, jnp.float32)))
  ref = [inter[t] @ w["w_down"].w[ids_mid[t]] for t in rows]
  np.testing.assert_allclose(jax.jit(se.ffn_apply)(ffn, x), np.stack(ref), rtol=1e-4,
                             atol=1e-4)
  # Each expert is SparseGPT of the dense weights on its own cluster's Hessian.
  for k in range(3):
    want, _ = sparse.sparsegpt(block["w_up"], sparse.hessian_from_inputs(x[ids_in == k]),
                               sparsity=0.5)
    np.testing.assert_allclose(ffn["w_up"].w[k], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dense_within_block", [True, False])
def test_pallas_expert_matmul_gets_block_masks_and_matches_xla(setup, dense_within_block):
  params, _, _ = setup
  block = llama.block_params(params, 0)
  x = jax.random.normal(jax.random.key(2), (128, 64))
  cfg = dict(method="sparse_expansion", sparsity=0.5, num_experts=3, pca_components=4,
             kmeans_restarts=2, kmeans_iters=10, dense_within_block=dense_within_block)
  auto, auto_info = se.compress_ffn_experts(jax.random.key(3), block, x,
                                            se.CompressionConfig(**cfg))
  assert all(bank.block_mask is None for bank in auto.values())  # "auto" is XLA on CPU
  # Without dense_within_block, down_proj is calibrated on the intermediate of the
  # compressed gate / up, which runs them through the kernel: they need their block masks
  # before that apply, not only once the FFN is complete.
  kernel, kernel_info = se.compress_ffn_experts(
      jax.random.key(3), block, x, se.CompressionConfig(**cfg, expert_matmul="pallas"))
  assert all(isinstance(bank.block_mask, BlockSparseMask) for bank in kernel.values())
  np.testing.assert_allclose(kernel_info["inter"], auto_info["inter"], rtol=1e-4, atol=1e-5)
  # The Pallas expert matmul (interpret mode on CPU; the banks jitted as they are) gives the
  # XLA apply's FFN output.
  apply = jax.jit(se.ffn_apply, static_argnums=2)
  np.testing.assert_allclose(apply(kernel, x, "pallas"), apply(auto, x, "xla"), rtol=1e-4,
                             atol=1e-4)


def test_neuron_selection_prunes_only_selected_neurons(setup):
  params, _, _ = setup
  block = llama.block_params(params, 0)
  x = jax.random.normal(jax.random.key(4), (256, 64))
  cfg = se.CompressionConfig(method="magnitude", sparsity=0.9, neuron_selection="wasserstein",
                             neuron_fraction=0.1)
  ffn, info = se.compress_ffn_single(jax.random.key(0), block, x, cfg)
  sel = info["w_up"]
  wd = np.asarray(wasserstein_to_gaussian(x @ block["w_up"]))
  assert set(sel) == set(np.argsort(wd)[-13:])  # ceil(0.1 * 128) highest WD
  w, mask = np.asarray(ffn["w_up"].w[0]), np.asarray(ffn["w_up"].mask[0])
  assert ffn["w_up"].router is None
  rest = np.setdiff1d(np.arange(128), sel)
  np.testing.assert_array_equal(w[:, rest], np.asarray(block["w_up"])[:, rest])
  assert np.all(mask[:, rest] == 1) and np.all(w[mask == 0] == 0)
  assert np.mean(w[:, sel] == 0) == pytest.approx(0.9, abs=0.01)
  assert np.mean(mask[:, sel] == 0) == pytest.approx(0.9, abs=0.01)


def test_bad_configs_name_the_argument():
  with pytest.raises(ValueError, match="sparsity"):
    se.CompressionConfig(sparsity=1.0)
  with pytest.raises(ValueError, match="n_m"):
    se.CompressionConfig(n_m=(4, 4))
  with pytest.raises(ValueError, match="method"):
    se.CompressionConfig(method="obs")
  with pytest.raises(ValueError, match="num_experts"):
    se.check_calibration_size(100, 8)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CONFIG = """
import sys
from absl import flags
from experiments import common, llm_setup
binary, calib_windows = sys.argv[1], int(sys.argv[2])
module = __import__("experiments." + binary, fromlist=["config_from_flags"])
flags.FLAGS(["b", "--flagfile=experiments/flags/" + binary + "_quick.flags"])
record = common.config_record(module.config_from_flags())
assert record["setup"]["calib_windows"] == calib_windows, record["setup"]
assert record["setup"]["layers"] == list(range(6))
owned = common.resolved_flags("experiments." + binary)
assert f"--calib_windows={calib_windows}" in owned and "--seed=0" in owned, owned  # its own
print(sorted(record))
"""


@pytest.mark.parametrize("binary, calib_windows", [("sparse_expansion", 32),
                                                   ("wasserstein", 16)])  # their quick flags
def test_config_is_read_once_and_shared_flags_belong_to_the_binary(binary, calib_windows):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  proc = subprocess.run([sys.executable, "-c", CONFIG, binary, str(calib_windows)],
                        capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "setup" in proc.stdout
