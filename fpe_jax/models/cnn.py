"""Convolutional classifiers for 28x28 grey images, as pure init/apply functions.

Two architectures, both taking images in [0, 1] (NHWC, [batch, 28, 28, channels]) and
normalising inside the model, as the ensemble-defence papers do (so that attacks and the
eps ball live in pixel space):

- "small": conv3x3/2 -> conv3x3/2 -> dense -> dense (about 0.4M parameters at width 32).
- "resnet20": the CIFAR ResNet-20 layout (a stem, 3 stages of 3 basic blocks at widths
  w, 2w, 4w, strides 1, 2, 2, global average pooling, a dense head) adapted to 28x28.

ResNet-20 here has no batch normalisation: batch statistics would make one image's logits
and input gradient depend on the other images in its batch, which breaks per-example
input gradients (the NCEn / GAL / TRS losses) and per-example attacks. Each residual branch
is instead scaled by a learnable scalar initialised to 0 (SkipInit, De & Smith 2020), so
the network starts as a well-conditioned chain of shortcuts.

Params are nested dicts of arrays; conv kernels are [kh, kw, c_in, c_out] and dense
weights [d_in, d_out] (y = x @ w).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fpe_jax.data.fashion_mnist import PIXEL_MEAN, PIXEL_STD

Params = dict[str, Any]
ARCHITECTURES = ("small", "resnet20")
ACTIVATIONS = ("relu", "leaky_relu")


class CNNConfig(NamedTuple):
  """Static description of a CNN (hashable, so it can close over jitted functions).

  Attributes:
    architecture: "small" or "resnet20".
    num_classes: number of output logits.
    width: channels of the first conv (small: 2 * width in the second conv; resnet20:
      stage widths width, 2 * width, 4 * width).
    hidden: width of the small CNN's dense hidden layer (unused by resnet20).
    activation: "relu" or "leaky_relu" (GAL needs leaky ReLU so that input gradients do
      not die).
    negative_slope: slope of leaky ReLU for negative inputs.
    in_channels: input channels.
    input_mean: subtracted from the [0, 1] pixels inside the model.
    input_std: divides the centred pixels inside the model.
  """
  architecture: str = "small"
  num_classes: int = 10
  width: int = 32
  hidden: int = 128
  activation: str = "relu"
  negative_slope: float = 0.1
  in_channels: int = 1
  input_mean: float = PIXEL_MEAN
  input_std: float = PIXEL_STD


def validate_config(config: CNNConfig) -> None:
  """Raises ValueError naming the first invalid field of `config`."""
  if config.architecture not in ARCHITECTURES:
    raise ValueError(f"architecture={config.architecture!r} is not one of {list(ARCHITECTURES)}")
  if config.activation not in ACTIVATIONS:
    raise ValueError(f"activation={config.activation!r} is not one of {list(ACTIVATIONS)}")
  for name in ("num_classes", "width", "hidden", "in_channels"):
    if getattr(config, name) < 1:
      raise ValueError(f"{name}={getattr(config, name)} must be >= 1")
  if config.input_std <= 0:
    raise ValueError(f"input_std={config.input_std} must be > 0")


def activation_fn(x: jax.Array, config: CNNConfig) -> jax.Array:
  if config.activation == "leaky_relu":
    return jax.nn.leaky_relu(x, config.negative_slope)
  return jax.nn.relu(x)


def conv2d(x: jax.Array, w: jax.Array, b: jax.Array | None = None, stride: int = 1) -> jax.Array:
  """SAME-padded 2-D convolution.

  Args:
    x: [batch, height, width, c_in].
    w: [kh, kw, c_in, c_out].
    b: [c_out] or None.
    stride: spatial stride.

  Returns:
    [batch, ceil(height / stride), ceil(width / stride), c_out].
  """
  y = jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y if b is None else y + b


def _conv_params(key: jax.Array, kh: int, kw: int, c_in: int, c_out: int) -> Params:
  fan_in = kh * kw * c_in
  w = jax.random.normal(key, (kh, kw, c_in, c_out), jnp.float32) * np.sqrt(2.0 / fan_in)
  return {"w": w, "b": jnp.zeros((c_out,), jnp.float32)}


def _dense_params(key: jax.Array, d_in: int, d_out: int, gain: float = 2.0) -> Params:
  w = jax.random.normal(key, (d_in, d_out), jnp.float32) * np.sqrt(gain / d_in)
  return {"w": w, "b": jnp.zeros((d_out,), jnp.float32)}


def _normalise(x: jax.Array, config: CNNConfig) -> jax.Array:
  return (x - config.input_mean) / config.input_std


def init_small_cnn(key: jax.Array, config: CNNConfig) -> Params:
  """Parameters of the small CNN: {conv1, conv2, dense1, dense2}, each {w, b}."""
  k1, k2, k3, k4 = jax.random.split(key, 4)
  # Two stride-2 SAME convs take 28 -> 14 -> 7.
  flat = 7 * 7 * 2 * config.width
  return {
      "conv1": _conv_params(k1, 3, 3, config.in_channels, config.width),
      "conv2": _conv_params(k2, 3, 3, config.width, 2 * config.width),
      "dense1": _dense_params(k3, flat, config.hidden),
      "dense2": _dense_params(k4, config.hidden, config.num_classes, gain=1.0),
  }


def apply_small_cnn(params: Params, x: jax.Array, config: CNNConfig) -> jax.Array:
  """Logits of the small CNN.

  Args:
    params: from `init_small_cnn`.
    x: [batch, 28, 28, in_channels] in [0, 1].
    config: the CNNConfig the params were made with.

  Returns:
    [batch, num_classes] logits.
  """
  h = _normalise(x, config)
  h = activation_fn(conv2d(h, params["conv1"]["w"], params["conv1"]["b"], stride=2), config)
  h = activation_fn(conv2d(h, params["conv2"]["w"], params["conv2"]["b"], stride=2), config)
  h = h.reshape(h.shape[0], -1)
  h = activation_fn(h @ params["dense1"]["w"] + params["dense1"]["b"], config)
  return h @ params["dense2"]["w"] + params["dense2"]["b"]


_RESNET_STAGES = 3
_RESNET_BLOCKS = 3


def _stage_plan(config: CNNConfig) -> list[tuple[int, int, int]]:
  """(c_in, c_out, stride) of every basic block, in order."""
  plan, c_in = [], config.width
  for stage in range(_RESNET_STAGES):
    c_out = config.width * 2**stage
    for block in range(_RESNET_BLOCKS):
      stride = 2 if (stage > 0 and block == 0) else 1
      plan.append((c_in, c_out, stride))
      c_in = c_out
  return plan


def init_resnet20(key: jax.Array, config: CNNConfig) -> Params:
  """Parameters of ResNet-20: {stem, block0..block8, head}.

  Each block holds conv1, conv2 ({w, b}), `gain` (a scalar, 0 at init) and, where the
  shape changes, a 1x1 `shortcut` conv.
  """
  plan = _stage_plan(config)
  keys = jax.random.split(key, len(plan) + 2)
  params: Params = {"stem": _conv_params(keys[0], 3, 3, config.in_channels, config.width)}
  for index, (c_in, c_out, stride) in enumerate(plan):
    k1, k2, k3 = jax.random.split(keys[index + 1], 3)
    block = {
        "conv1": _conv_params(k1, 3, 3, c_in, c_out),
        "conv2": _conv_params(k2, 3, 3, c_out, c_out),
        "gain": jnp.zeros((), jnp.float32),
    }
    if stride != 1 or c_in != c_out:
      block["shortcut"] = _conv_params(k3, 1, 1, c_in, c_out)
    params[f"block{index}"] = block
  params["head"] = _dense_params(keys[-1], plan[-1][1], config.num_classes, gain=1.0)
  return params


def apply_resnet20(params: Params, x: jax.Array, config: CNNConfig) -> jax.Array:
  """Logits of ResNet-20.

  Args:
    params: from `init_resnet20`.
    x: [batch, 28, 28, in_channels] in [0, 1].
    config: the CNNConfig the params were made with.

  Returns:
    [batch, num_classes] logits.
  """
  h = activation_fn(conv2d(_normalise(x, config), params["stem"]["w"], params["stem"]["b"]),
                    config)
  for index, (_, _, stride) in enumerate(_stage_plan(config)):
    block = params[f"block{index}"]
    branch = activation_fn(conv2d(h, block["conv1"]["w"], block["conv1"]["b"], stride), config)
    branch = conv2d(branch, block["conv2"]["w"], block["conv2"]["b"])
    shortcut = h
    if "shortcut" in block:
      shortcut = conv2d(h, block["shortcut"]["w"], block["shortcut"]["b"], stride)
    h = activation_fn(shortcut + block["gain"] * branch, config)
  h = jnp.mean(h, axis=(1, 2))
  return h @ params["head"]["w"] + params["head"]["b"]


def init_cnn(key: jax.Array, config: CNNConfig) -> Params:
  """Parameters of the CNN that `config.architecture` names."""
  validate_config(config)
  if config.architecture == "resnet20":
    return init_resnet20(key, config)
  return init_small_cnn(key, config)


def apply_cnn(params: Params, x: jax.Array, config: CNNConfig) -> jax.Array:
  """Logits [batch, num_classes] of the CNN that `config.architecture` names; x in [0, 1]."""
  if config.architecture == "resnet20":
    return apply_resnet20(params, x, config)
  return apply_small_cnn(params, x, config)


def count_params(params: Params) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params)))
