"""CNNs: the small CNN against a plain numpy forward pass; ResNet-20's structure."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpe_jax.models import cnn

# Jitted: eager init compiles each random op separately.
init = jax.jit(cnn.init_cnn, static_argnums=1)


def np_conv_same(x, w, b, stride):
  """SAME-padded cross-correlation (XLA/TF padding: the extra row/column goes after)."""
  n, h, wd, _ = x.shape
  kh, kw, _, c_out = w.shape
  out_h, out_w = -(-h // stride), -(-wd // stride)
  pad_h = max((out_h - 1) * stride + kh - h, 0)
  pad_w = max((out_w - 1) * stride + kw - wd, 0)
  xp = np.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                  (0, 0)))
  y = np.zeros((n, out_h, out_w, c_out))
  for i in range(out_h):
    for j in range(out_w):
      patch = xp[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      y[:, i, j, :] = np.einsum("nhwc,hwco->no", patch, w)
  return y + b


def np_small_cnn(params, x, config):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  act = (lambda v: np.where(v > 0, v, config.negative_slope * v)) \
      if config.activation == "leaky_relu" else (lambda v: np.maximum(v, 0))
  h = (np.asarray(x, np.float64) - config.input_mean) / config.input_std
  h = act(np_conv_same(h, p["conv1"]["w"], p["conv1"]["b"], 2))
  h = act(np_conv_same(h, p["conv2"]["w"], p["conv2"]["b"], 2))
  h = act(h.reshape(len(h), -1) @ p["dense1"]["w"] + p["dense1"]["b"])
  return h @ p["dense2"]["w"] + p["dense2"]["b"]


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_small_cnn_matches_numpy_forward(activation):
  config = cnn.CNNConfig(width=3, hidden=5, activation=activation)
  params = init(jax.random.key(0), config)
  # Random biases so that both branches of the activation are exercised.
  params = jax.tree.map(lambda a: a + 0.1 if a.ndim == 1 else a, params)
  x = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1))
  got = jax.jit(cnn.apply_cnn, static_argnums=2)(params, x, config)
  np.testing.assert_allclose(got, np_small_cnn(params, x, config), rtol=1e-4, atol=1e-4)


def test_resnet20_structure_and_skipinit():
  config = cnn.CNNConfig(architecture="resnet20", width=4, activation="leaky_relu")
  params = init(jax.random.key(0), config)
  blocks = [k for k in params if k.startswith("block")]
  assert len(blocks) == 9  # 3 stages x 3 blocks; + stem + head = 20 weight layers
  assert [("shortcut" in params[b]) for b in sorted(blocks)] == [
      False, False, False, True, False, False, True, False, False]
  assert params["head"]["w"].shape == (16, 10)
  apply = jax.jit(cnn.apply_cnn, static_argnums=2)
  x = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1))
  logits = apply(params, x, config)
  assert logits.shape == (3, 10) and np.all(np.isfinite(logits))
  # Residual gains start at 0: the branches' weights do not affect the output yet...
  scrambled = {k: ({**v, "conv1": jax.tree.map(lambda a: a * 3.0, v["conv1"])}
                   if k.startswith("block") else v) for k, v in params.items()}
  np.testing.assert_allclose(apply(scrambled, x, config), logits, rtol=1e-5, atol=1e-6)
  # ...and do once a gain is non-zero.
  scrambled["block4"]["gain"] = jnp.ones(())
  assert not np.allclose(apply(scrambled, x, config), logits, atol=1e-4)


def test_normalisation_is_inside_the_model():
  config = cnn.CNNConfig(width=2, hidden=4)
  params = init(jax.random.key(0), config)
  x = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1))
  shifted = config._replace(input_mean=config.input_mean + 0.1)
  apply = jax.jit(cnn.apply_cnn, static_argnums=2)
  np.testing.assert_allclose(apply(params, x + 0.1, shifted), apply(params, x, config),
                             rtol=1e-4, atol=1e-5)


def test_bad_config_raises_naming_the_field():
  with pytest.raises(ValueError, match="architecture='vgg' is not one of"):
    cnn.init_cnn(jax.random.key(0), cnn.CNNConfig(architecture="vgg"))
  with pytest.raises(ValueError, match="activation='gelu' is not one of"):
    cnn.init_cnn(jax.random.key(0), cnn.CNNConfig(activation="gelu"))
  with pytest.raises(ValueError, match="width=0 must be >= 1"):
    cnn.init_cnn(jax.random.key(0), cnn.CNNConfig(width=0))
