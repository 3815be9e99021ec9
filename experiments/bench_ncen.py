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

import functools
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

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
  flags.register_validator(_name, lambda v: v >= 1, message=f"--{_name}: must be >= 1")
flags.register_validator("num_members", lambda v: v >= 2,
                         message="--num_members: must be >= 2 (NCEn compares members)")


def one_step(loss_fn, optimizer):
  """A jitted one-step chunk, (state, x, y) -> (state, metrics); its minibatch is drawn
  (with replacement, as in training) from the --batch_size images x."""
  chunk = jax.jit(train.make_train_chunk(loss_fn, optimizer, batch_size=FLAGS.batch_size,
                                         steps=1))
  key = jax.random.key(0)
  return lambda state, x, y: chunk(state, x, y, key)


def seconds_per_step(step, state, x, y) -> float:
  state, _ = step(state, x, y)  # compile
  jax.block_until_ready(state)
  times = []
  for _ in range(FLAGS.repeats):
    t0 = time.perf_counter()
    for _ in range(FLAGS.iters):
      state, _ = step(state, x, y)
    jax.block_until_ready(state)
    times.append((time.perf_counter() - t0) / FLAGS.iters)
  return statistics.median(times)


def main(argv):
  del argv
  config = cnn.CNNConfig(architecture=FLAGS.architecture, width=FLAGS.width, hidden=FLAGS.hidden,
                         activation="leaky_relu")
  apply_fn = functools.partial(cnn.apply_cnn, config=config)
  members = FLAGS.num_members
  images, labels = fashion_mnist.load_fashion_mnist("train")
  x, y = jnp.asarray(images[:FLAGS.batch_size]), jnp.asarray(labels[:FLAGS.batch_size])
  optimizer = train.make_optimizer("adam", 1e-3)
  stacked = ensemble.init_members(functools.partial(cnn.init_cnn, config=config),
                                  jax.random.key(0), members)

  def timed(name, member_map):
    loss = ensemble.make_loss(apply_fn, ensemble.LossConfig(name=name, member_map=member_map),
                              members)
    return seconds_per_step(one_step(loss, optimizer), train.init_state(stacked, optimizer), x, y)

  ncen, independent = timed("ncen", "vmap"), timed("independent", "vmap")
  ncen_unrolled, independent_unrolled = timed("ncen", "unroll"), timed("independent", "unroll")

  single_loss = ensemble.make_loss(apply_fn, ensemble.LossConfig(name="independent"), 1)
  single_step = one_step(single_loss, optimizer)
  singles = [train.init_state(ensemble.stack_members([p]), optimizer)
             for p in ensemble.unstack_members(stacked)]

  def sequential(states, xb, yb):
    out = [single_step(s, xb, yb) for s in states]
    return [s for s, _ in out], None

  one_after_another = seconds_per_step(sequential, singles, x, y)
  print(f"devices: {jax.devices()}")
  print(f"model: {FLAGS.architecture} width {FLAGS.width}, {members} members, batch "
        f"{FLAGS.batch_size}; median of {FLAGS.repeats} x {FLAGS.iters} steps")
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
  app.run(main)
