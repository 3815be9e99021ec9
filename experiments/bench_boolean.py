"""Benchmark: S seeds vmapped into one jitted program vs S sequential runs, same work.

  python -m experiments.bench_boolean [--seeds=8 --steps=20000]

All sides train the headline Boolean MLP (d=64, 8 hidden neurons, batch 64) for the same
number of steps per seed, in the same process. Two sequential baselines:
  - "separate runs": each run traces and compiles its own program, as a Python loop
    over runs does when each run builds its step function (end to end, compile included);
  - "one program reused": the S runs share one compiled program, called S times
    (steady state, compile excluded).
The vmapped program is timed end to end (its one compile included) and in steady state.
"""

import dataclasses

import jax
import jax.numpy as jnp
from absl import flags

from experiments import common
from fpe_jax import nn, train

FLAGS = flags.FLAGS
flags.DEFINE_integer("seeds", 8, "Runs to train.")
flags.DEFINE_integer("steps", 20000, "Steps per run (the paper flagfile's --steps).")
flags.DEFINE_integer("d", 64, "Input width (>= 2: the target is x_0 AND x_1).")
flags.DEFINE_integer("neurons", 8, "Hidden width.")
flags.DEFINE_integer("batch_size", 64, "Minibatch size.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions; the best is reported.")

for _name in ("seeds", "steps", "neurons", "batch_size", "repeats"):
  common.flag_validator(_name, lambda v: v >= 1, "must be >= 1")
common.flag_validator("d", lambda v: v >= 2, "must be >= 2 (the target is x_0 AND x_1)")


@dataclasses.dataclass(frozen=True)
class Config:
  """The benchmark's flags, read once (`config_from_flags`).

  Attributes:
    seeds: runs trained by each side.
    steps: optimiser steps per run.
    d: input width.
    neurons: hidden width.
    batch_size: minibatch size.
    repeats: timed repetitions of the steady-state sides (the best is reported).
  """
  seeds: int
  steps: int
  d: int
  neurons: int
  batch_size: int
  repeats: int


def config_from_flags() -> Config:
  """The config of the parsed flags (every check is a single-flag validator)."""
  return Config(seeds=FLAGS.seeds, steps=FLAGS.steps, d=FLAGS.d, neurons=FLAGS.neurons,
                batch_size=FLAGS.batch_size, repeats=FLAGS.repeats)


def main(argv):
  if len(argv) > 1:
    raise common.UsageError(f"unexpected arguments {argv[1:]}; use --flags")
  config = config_from_flags()
  optimizer = train.make_optimizer("adam", 1e-3)
  loss_fn = train.supervised_loss(nn.apply_mlp, train.sigmoid_bce)
  new_chunk = lambda: train.make_train_chunk(loss_fn, optimizer, batch_size=config.batch_size,
                                             steps=config.steps)
  chunk = new_chunk()
  states = [train.init_state(p, optimizer, nn.full_masks(p))
            for p in (nn.init_mlp(jax.random.key(s), [config.d, config.neurons, 1])
                      for s in range(config.seeds))]
  xs = [jax.random.bernoulli(jax.random.key(100 + s), 0.5, (4096, config.d)).astype(jnp.float32)
        for s in range(config.seeds)]
  ys = [(x[:, 0] * x[:, 1] > 0).astype(jnp.int32) for x in xs]
  keys = [jax.random.key(200 + s) for s in range(config.seeds)]
  stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)
  batched_args = (stack(states), stack(xs), stack(ys), stack(keys))

  def separate_runs():
    out = []
    for s in range(config.seeds):
      fresh = new_chunk()
      out.append(jax.block_until_ready(jax.jit(fresh)(states[s], xs[s], ys[s], keys[s])))
    return out

  def vmapped_end_to_end():
    fresh = new_chunk()
    return jax.jit(jax.vmap(fresh))(*batched_args)

  one = jax.jit(chunk)
  many = jax.jit(jax.vmap(chunk))
  first_call = lambda fn: common.time_calls(fn, 0)[0]  # compile included
  best_later_call = lambda fn: min(common.time_calls(fn, config.repeats)[1])
  timings = {
      "sequential, separate runs (compile each)": first_call(separate_runs),
      "vmapped, end to end (one compile)": first_call(vmapped_end_to_end),
      "sequential, one program reused": best_later_call(
          lambda: [one(states[s], xs[s], ys[s], keys[s]) for s in range(config.seeds)]),
      "vmapped, steady state": best_later_call(lambda: many(*batched_args)),
  }
  total = config.seeds * config.steps
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); "
        f"{config.seeds} runs x {config.steps} steps, MLP [{config.d}, {config.neurons}, 1], "
        f"batch {config.batch_size}")
  for name, seconds in timings.items():
    print(f"  {name:42s} {seconds:8.3f} s  {total / seconds:12,.0f} run-steps/s")
  t = list(timings.values())
  print(f"end to end:   vmapped is {t[0] / t[1]:.1f}x faster than {config.seeds} separate runs")
  print(f"steady state: vmapped is {t[2] / t[3]:.1f}x faster than one program reused "
        f"{config.seeds} times")


if __name__ == "__main__":
  common.run(main)
