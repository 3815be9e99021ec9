r"""FPE in deeper models on Fashion-MNIST: a deep MLP on pixels and a CNN's head.

  python -m experiments.deep --flagfile=experiments/flags/deep_quick.flags

Tasks:
- "mlp": an MLP [784, width x --depth, 10] (5 hidden layers by default) on the pixels;
  FPE expands EVERY hidden layer and restores the budget under one global magnitude
  threshold over all of them (fpe.expand with all layers).
- "cnn": a trainable conv backbone (the first two convs of fpe_jax.models.cnn's small CNN:
  conv3x3/2 with --cnn_channels channels, conv3x3/2 with twice that, ReLU) and an MLP head
  [7*7*2*channels, width, 10] whose hidden layer FPE expands; the backbone trains on in
  every arm and counts in the non-zeros.
Arms (dense, FPE random / feature / overlap, DropConnect, larger dense models) and the
summaries are described in experiments/fpe_sweep.py. Pixels are scaled to [0, 1] and
standardised with the training set's mean and std (fashion_mnist.PIXEL_MEAN / PIXEL_STD).
"""

import dataclasses
import functools

import numpy as np
from absl import flags

from experiments import common, fpe_sweep
from fpe_jax.data import fashion_mnist, subsets
from fpe_jax.models import cnn

FLAGS = flags.FLAGS
TASKS = ("mlp", "cnn")

flags.DEFINE_list("tasks", list(TASKS), f"Tasks among {', '.join(TASKS)}.")
flags.DEFINE_integer("depth", 5, "Hidden layers of the mlp task (all expanded, one budget).")
flags.DEFINE_integer("cnn_channels", 8, "Channels of the cnn task's first conv.")
flags.DEFINE_integer("train_size", 0, "Train on a stratified sample of N of the 60,000 training "
                     "images, drawn by --seed (0: all of them).")
flags.DEFINE_string("data_dir", "", "Folder of the Fashion-MNIST idx files (default: "
                    "Debian's /usr/share/datasets/fashion-mnist).")
fpe_sweep.define_sweep_flags()

common.flag_validator("tasks", lambda v: bool(v) and set(v) <= set(TASKS),
                      f"a comma list of tasks among {', '.join(TASKS)}")
common.flag_validator("depth", lambda v: v >= 1, "must be >= 1")
common.flag_validator("cnn_channels", lambda v: v >= 1, "must be >= 1")
common.flag_validator("train_size", lambda v: v == 0 or 10 <= v <= 60000,
                      "must be 0 (all) or in [10, 60000] (a sample holding the 10 classes)")


@dataclasses.dataclass(frozen=True)
class Config:
  """The deep binary's flags, read once (`config_from_flags`).

  Attributes:
    tasks: among TASKS.
    depth: hidden layers of the mlp task.
    cnn_channels: channels of the cnn task's first conv.
    train_size: training images used, a stratified sample drawn by the sweep seed (0: all).
    data_dir: the Fashion-MNIST folder ("": the default).
    sweep: the sweep.
  """
  tasks: tuple[str, ...]
  depth: int
  cnn_channels: int
  train_size: int
  data_dir: str
  sweep: fpe_sweep.SweepConfig


def config_from_flags() -> Config:
  """The config of the parsed flags; raises `common.UsageError` on a bad combination."""
  f = FLAGS
  return Config(tasks=tuple(t for t in TASKS if t in f.tasks), depth=f.depth,
                cnn_channels=f.cnn_channels, train_size=f.train_size, data_dir=f.data_dir,
                sweep=fpe_sweep.real_data_sweep_config(f))


def mlp_spec(depth: int) -> fpe_sweep.ModelSpec:
  return fpe_sweep.ModelSpec(
      head_sizes=lambda h: [28 * 28] + [h] * depth + [fashion_mnist.NUM_CLASSES],
      expand_layers=tuple(range(depth)))


def cnn_spec(channels: int) -> fpe_sweep.ModelSpec:
  """The conv backbone of cnn.py's small CNN (its own dense layers replaced by the head)."""
  # The images are standardised outside (see load_tasks), so the model does not normalise.
  config = cnn.CNNConfig(architecture="small", width=channels, input_mean=0.0, input_std=1.0)

  def init_backbone(key):
    params = cnn.init_small_cnn(key, config)
    return {"conv1": params["conv1"], "conv2": params["conv2"]}

  def backbone(params, x):  # x: [n, 28, 28, 1] -> [n, 7 * 7 * 2 * channels]
    h = cnn.activation_fn(cnn.conv2d(x, params["conv1"]["w"], params["conv1"]["b"], 2), config)
    h = cnn.activation_fn(cnn.conv2d(h, params["conv2"]["w"], params["conv2"]["b"], 2), config)
    return h.reshape(h.shape[0], -1)

  return fpe_sweep.ModelSpec(
      head_sizes=lambda h: [7 * 7 * 2 * channels, h, fashion_mnist.NUM_CLASSES],
      expand_layers=(0,), init_backbone=init_backbone, backbone=backbone)


def load_tasks(cfg: Config) -> dict:
  """{task: (ModelSpec, TaskData, info)}; raises UsageError on missing data."""
  try:
    x_train, y_train = fashion_mnist.load_fashion_mnist("train", cfg.data_dir or None)
    x_test, y_test = fashion_mnist.load_fashion_mnist("test", cfg.data_dir or None)
  except (FileNotFoundError, ValueError) as e:  # missing or corrupt files
    raise common.UsageError(f"--data_dir: {e}") from None
  if cfg.train_size:
    keep = subsets.stratified_subset(y_train, cfg.train_size, cfg.sweep.seed)
    x_train, y_train = x_train[keep], y_train[keep]
  standardise = lambda x: (x - fashion_mnist.PIXEL_MEAN) / fashion_mnist.PIXEL_STD
  x_train, x_test = standardise(x_train), standardise(x_test)
  tasks = {}
  for name in cfg.tasks:
    if name == "mlp":
      spec = mlp_spec(cfg.depth)
      data = fpe_sweep.TaskData(x_train.reshape(len(x_train), -1), y_train,
                               x_test.reshape(len(x_test), -1), y_test,
                               fashion_mnist.NUM_CLASSES)
      info = {"model": f"MLP [784, width x {cfg.depth}, 10], every hidden layer expanded"}
    else:
      spec = cnn_spec(cfg.cnn_channels)
      data = fpe_sweep.TaskData(x_train, y_train, x_test, y_test, fashion_mnist.NUM_CLASSES)
      info = {"model": f"conv3x3/2 ({cfg.cnn_channels} ch) -> conv3x3/2 "
                       f"({2 * cfg.cnn_channels} ch) -> MLP head [width] (expanded) -> 10"}
    info.update({"num_classes": fashion_mnist.NUM_CLASSES, "train": int(len(data.y_train)),
                 "test": int(len(data.y_test)),
                 "majority_test_accuracy": float(np.bincount(y_test).max() / len(y_test))})
    tasks[name] = (spec, data, info)
  return tasks


main = functools.partial(fpe_sweep.real_data_main, "deep", __name__, config_from_flags,
                         load_tasks)

if __name__ == "__main__":
  common.run(main)
