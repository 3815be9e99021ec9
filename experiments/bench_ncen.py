r"""Step-time ratios of ensemble training: NCEn (double backprop) and vmapped members.

  python -m experiments.bench_ncen [--architecture=small --width=32 --batch_size=128]

Prints, for M members on one Fashion-MNIST batch (Adam, one-step `train.make_train_chunk`
calls, timed after a warm-up compile, median over --repeats of --iters steps):
  1. NCEn step (vmapped, double backprop through input gradients) / independent step
     (vmapped, plain CE);
  2. one vmapped step of M independent members / M single-member steps run one after
     another (each its own jitted call);
  3. the same two steps with the members unrolled inside one program
     (`member_map="unroll"`), which avoids XLA's grouped convolutions on CPU.
"""

import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
from absl import flags

from experiments import common
from fpe_jax import ensemble, train
from fpe_jax.data import fashion_mnist
from fpe_jax.models import cnn

FLAGS = flags.FLAGS
flags.DEFINE_enum("architecture", "small", cnn.ARCHITECTURES, "CNN architecture.")
flags.DEFINE_integer("width", 32, "Channels of the first conv.")
flags.DEFINE_integer("hidden", 128, "Dense hidden width of the small CNN.")
flags.DEFINE_integer("num_members", 3, "Ensemble members M (>= 2).")
flags.DEFINE_integer("batch_size", 128, "Images per step.")
flags.DEFINE_integer("iters", 10, "Steps per timing.")
flags.DEFINE_integer("repeats", 3, "Timings; the median is reported.")
for _name in ("width", "hidden", "batch_size", "iters", "repeats"):
  common.flag_validator(_name, lambda v: v >= 1, "must be >= 1")
common.flag_validator("num_members", lambda v: v >= 2, "must be >= 2 (NCEn compares members)")


@dataclasses.dataclass(frozen=True)
class Config:
  """The benchmark's flags, read once (`config_from_flags`).

  Attributes:
    model: the member CNN (leaky ReLU).
    num_members: M.
    batch_size: images per step.
    iters: steps per timing.
    repeats: timings (the median is reported).
  """
  model: cnn.CNNConfig
  num_members: int
  batch_size: int
  iters: int
  repeats: int


def config_from_flags() -> Config:
  """The config of the parsed flags (every check is a single-flag validator)."""
  model = cnn.CNNConfig(architecture=FLAGS.architecture, width=FLAGS.width, hidden=FLAGS.hidden,
                        activation="leaky_relu")
  return Config(model=model, num_members=FLAGS.num_members, batch_size=FLAGS.batch_size,
                iters=FLAGS.iters, repeats=FLAGS.repeats)


def one_step(loss_fn, optimizer, batch_size: int):
  """A jitted one-step chunk, (state, x, y) -> (state, metrics); its minibatch is drawn
  (with replacement, as in training) from the `batch_size` images x."""
  chunk = jax.jit(train.make_train_chunk(loss_fn, optimizer, batch_size=batch_size, steps=1))
  key = jax.random.key(0)
  return lambda state, x, y: chunk(state, x, y, key)


def seconds_per_step(step, state, x, y, config: Config) -> float:
  """Median over `config.repeats` of the mean time of `config.iters` steps, after a compile."""
  state, _ = step(state, x, y)  # compile
  jax.block_until_ready(state)
  times = []
  for _ in range(config.repeats):
    t0 = time.perf_counter()
    for _ in range(config.iters):
      state, _ = step(state, x, y)
    jax.block_until_ready(state)
    times.append((time.perf_counter() - t0) / config.iters)
  return statistics.median(times)


def main(argv):
  if len(argv) > 1:
    raise common.UsageError(f"unexpected arguments {argv[1:]}; use --flags")
  config = config_from_flags()
  model = config.model
  apply_fn = functools.partial(cnn.apply_cnn, config=model)
  members = config.num_members
  images, labels = fashion_mnist.load_fashion_mnist("train")
  common.validate("batch_size", config.batch_size <= len(labels),
                  f"{config.batch_size} exceeds the {len(labels)} training images")
  x, y = jnp.asarray(images[:config.batch_size]), jnp.asarray(labels[:config.batch_size])
  optimizer = train.make_optimizer("adam", 1e-3)
  stacked = ensemble.init_members(functools.partial(cnn.init_cnn, config=model),
                                  jax.random.key(0), members)

  def timed(name, member_map):
    loss = ensemble.make_loss(apply_fn, ensemble.LossConfig(name=name, member_map=member_map),
                              members)
    return seconds_per_step(one_step(loss, optimizer, config.batch_size),
                            train.init_state(stacked, optimizer), x, y, config)

  ncen, independent = timed("ncen", "vmap"), timed("independent", "vmap")
  ncen_unrolled, independent_unrolled = timed("ncen", "unroll"), timed("independent", "unroll")

  single_loss = ensemble.make_loss(apply_fn, ensemble.LossConfig(name="independent"), 1)
  single_step = one_step(single_loss, optimizer, config.batch_size)
  singles = [train.init_state(ensemble.stack_members([p]), optimizer)
             for p in ensemble.unstack_members(stacked)]

  def sequential(states, xb, yb):
    out = [single_step(s, xb, yb) for s in states]
    return [s for s, _ in out], None

  one_after_another = seconds_per_step(sequential, singles, x, y, config)
  print(f"devices: {jax.devices()}")
  print(f"model: {model.architecture} width {model.width}, {members} members, batch "
        f"{config.batch_size}; median of {config.repeats} x {config.iters} steps")
  rows = [("NCEn step, vmapped (double backprop)", ncen),
          ("independent step, vmapped", independent),
          (f"{members} single-member steps in sequence", one_after_another),
          ("NCEn step, members unrolled", ncen_unrolled),
          ("independent step, members unrolled", independent_unrolled)]
  for name, seconds in rows:
    print(f"{name:40s} {1e3 * seconds:9.2f} ms")
  print(f"ratio NCEn / independent (vmapped):      {ncen / independent:6.2f}x")
  print(f"ratio NCEn / independent (unrolled):     {ncen_unrolled / independent_unrolled:6.2f}x")
  print(f"ratio {members} sequential / vmapped:           "
        f"{one_after_another / independent:6.2f}x  (> 1: vmap is faster)")
  print(f"ratio unrolled / vmapped (independent):  {independent_unrolled / independent:6.2f}x")


if __name__ == "__main__":
  common.run(main)
