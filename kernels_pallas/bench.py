"""Speed of the block-sparse kernels against XLA's dense matmul, by device timers, as ratios.

  python -m kernels_pallas.bench --out=bench.jsonl             # on a GPU or TPU host
  python -m kernels_pallas.bench --dry_run --out=/tmp/dry.jsonl  # tiny shapes, any host

Cases (block density = fraction of (bk, bn) weight blocks that are non-zero, chosen at
random with the same number of blocks in every column-block):
  square:  x[1024, 4096] @ w[4096, 4096].
  experts: SmolLM2 FFN shapes, 1024 tokens routed uniformly to E in {8, 16} experts,
           w[E, 576, 1536] and w[E, 1536, 576]; the dense baseline is ONE dense FFN
           matmul over all tokens (what a dense layer of the same shape costs), and XLA's
           ragged_dot on the masked experts is timed beside it.

Every row times the kernel (with the element mask, and `premasked`) and its baseline on
the same data in the same process. The times are DEVICE times from a JAX profiler trace
of --iters calls (`device_seconds`: the kernels on a GPU's streams, a TPU's "XLA Ops";
on CPU the XLA ops on XLA's threads), with wall-clock times beside them; a trace without
device events falls back to wall clock, and every row says which timer it used.
speedup = baseline / kernel, printed beside the ideal 1 / density and the weight bytes read
(each non-zero block once, plus the element mask where it is loaded). Each row is
appended to --out (JSONL) as soon as it is measured; --budget_s stops before a case
that would start after the budget (the first always runs), and the skipped cases are
recorded.

On CPU the kernels run in the Pallas interpreter, so the bench always runs the dry run
there: small shapes, both kernels, correctness against the dense numbers, the same
timers and output (CPU times say nothing about GPU or TPU speed).
"""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import common  # the binaries' flag checks and one-line errors
from kernels_pallas.block_sparse import BlockSparseMask, block_sparse_matmul
from kernels_pallas.expert_matmul import expert_matmul, expert_matmul_reference

CASES = ("square", "experts")

_CASES = flags.DEFINE_list("cases", list(CASES), f"Cases, any of {', '.join(CASES)}.")
_DENSITIES = flags.DEFINE_list("densities", ["1", "0.5", "0.25", "0.1"],
                               "Block densities, each in (0, 1].")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Input dtype.")
_ITERS = flags.DEFINE_integer("iters", 20, "Calls per trace (the time is their mean).",
                              lower_bound=1)
_GRAD = flags.DEFINE_bool("grad", True, "Also time forward+backward (grads of x and w).")
_BLOCK_K = flags.DEFINE_integer("block_k", 128, "Weight block rows (bk).", lower_bound=1)
_BLOCK_N = flags.DEFINE_integer("block_n", 128, "Weight block columns (bn).", lower_bound=1)
_BLOCK_M = flags.DEFINE_integer("block_m", 128, "Row tile cap.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of masks and data.")
_TIMER = flags.DEFINE_enum("timer", "device", ["device", "wall"],
                           "device: profiler device times (wall clock beside them); wall: "
                           "wall clock only.")
_OUT = flags.DEFINE_string("out", None, "JSONL file the rows are appended to as measured; "
                           "must not exist yet.", required=True)
_BUDGET = flags.DEFINE_float("budget_s", 420.0, "Start no case after this many seconds "
                             "(the first always runs, so a run always measures one row).",
                             lower_bound=0.0)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Tiny shapes (what CPU always runs).")

# (rows, k, n), expert counts and block shape of the full run and of the dry run.
FULL = {"square": (1024, 4096, 4096), "experts": (1024, ((576, 1536), (1536, 576)), (8, 16))}
DRY = {"square": (64, 256, 192), "experts": (64, ((256, 192),), (4,))}
DRY_BLOCK = (32, 32)


def _numbers(values, kind) -> list | None:
  try:
    return [kind(v) for v in values]
  except ValueError:
    return None


common.seed_validator("seed")
common.flag_validator("cases", lambda cases: bool(cases) and set(cases) <= set(CASES),
                      f"must list some of {', '.join(CASES)}")
common.flag_validator(
    "densities", lambda v: (d := _numbers(v, float)) is not None and all(0 < x <= 1 for x in d),
    "must be numbers in (0, 1]")


def block_mask(rng: np.random.Generator, k: int, n: int, block_shape: tuple[int, int],
               density: float) -> np.ndarray:
  """[k, n] 0/1 mask with round(density * Kb) random full blocks in every column-block."""
  bk, bn = block_shape
  kb, nb = -(-k // bk), -(-n // bn)
  per_col = max(1, round(density * kb))
  blocks = np.zeros((kb, nb), bool)
  for c in range(nb):
    blocks[rng.choice(kb, per_col, replace=False), c] = True
  return np.kron(blocks, np.ones((bk, bn), bool))[:k, :n]


def weight_bytes(bsm: BlockSparseMask, itemsize: int, premasked: bool = False) -> int:
  """Bytes of weight (and element mask) a kernel reads: each non-zero block once, plus
  the int8 mask of every non-zero block unless the weights are premasked."""
  blocks = int(np.sum(np.asarray(bsm.blocks.block_slots) >= 0))
  bk, bn = bsm.block_shape
  return blocks * bk * bn * (itemsize + (0 if premasked else 1))


def _event_lines(plane) -> list:
  """The lines of a profiler plane that hold the device's own work, without duplicates:
  a TPU's (or any derived) "XLA Ops" line, else a GPU's "Stream #..." lines; on the host
  plane, the threads XLA:CPU runs its ops on."""
  lines = list(plane.lines)
  if plane.name.startswith("/device:"):
    ops = [line for line in lines if line.name == "XLA Ops"]
    return ops or [line for line in lines if line.name.startswith("Stream")]
  return [line for line in lines if line.name.startswith("tf_XLA")]


def kernel_seconds(profile) -> tuple[str, dict[str, float]]:
  """(source, {event name: total seconds}) of the device work in a jax.profiler.ProfileData:
  the device planes' events if there are any, else XLA:CPU's ops ("cpu ops")."""
  planes = list(profile.planes)
  device = [p for p in planes if p.name.startswith("/device:")]
  source = "device" if device else "cpu ops"
  totals: dict[str, float] = {}
  for plane in device or [p for p in planes if p.name == "/host:CPU"]:
    for line in _event_lines(plane):
      for event in line.events:
        if event.duration_ns > 0 and not event.name.startswith(("end: ", "Threadpool")):
          totals[event.name] = totals.get(event.name, 0.0) + event.duration_ns * 1e-9
  return source, totals


def time_calls(fn: Callable, *args, calls: int, timer: str) -> dict:
  """Mean seconds per call of `fn(*args)` after a warm-up: {"wall_s", "timer", and with
  the device timer "s" (device seconds) and "kernels" (the 3 costliest event names)}."""
  jax.block_until_ready(fn(*args))  # compile and warm up
  with tempfile.TemporaryDirectory() as trace_dir:
    if timer == "device":
      jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    try:
      for _ in range(calls):
        out = fn(*args)
      jax.block_until_ready(out)
    finally:
      wall = (time.perf_counter() - start) / calls
      if timer == "device":
        jax.profiler.stop_trace()
    result = {"wall_s": wall, "timer": "wall", "s": wall}
    traces = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if traces:
      source, totals = kernel_seconds(jax.profiler.ProfileData.from_file(traces[0]))
      if totals:
        top = sorted(totals.items(), key=lambda kv: -kv[1])[:3]
        result.update(timer=source, s=sum(totals.values()) / calls,
                      kernels={name: s / calls for name, s in top})
  return result


def _rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def _grad_of(f):
  return jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32)), argnums=(0, 1)))


def _timed_pair(kernels: dict[str, Callable], baseline: Callable, args, calls: int,
                timer: str) -> dict:
  """Times the baseline and each named kernel on the same args: {"baseline": t, name: t}."""
  out = {"baseline": time_calls(baseline, *args, calls=calls, timer=timer)}
  for name, fn in kernels.items():
    out[name] = time_calls(fn, *args, calls=calls, timer=timer)
  return out


def _square_rows(rng, dtype, densities, block, dry: bool) -> Iterator[Callable[[], dict]]:
  rows, k, n = (DRY if dry else FULL)["square"]
  x = jnp.asarray(rng.normal(size=(rows, k)), dtype)
  w = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), dtype)
  dense = jax.jit(lambda x, w: x @ w)
  for density in densities:
    def measure(density=density):
      mask = block_mask(rng, k, n, block, density)
      bsm = BlockSparseMask.from_mask(mask, block_shape=block)
      w_masked = w * jnp.asarray(mask, dtype)
      op = lambda premasked: lambda x, w: block_sparse_matmul(  # noqa: E731
          x, w, bsm, implementation="pallas", block_m=_BLOCK_M.value, premasked=premasked)
      want = jnp.asarray(x, jnp.float32) @ jnp.asarray(w_masked, jnp.float32)
      err = max(_rel_err(jax.jit(op(p))(x, w_masked), want) for p in (False, True))
      kernels = {"masked": jax.jit(op(False)), "premasked": jax.jit(op(True))}
      times = {"forward": _timed_pair(kernels, dense, (x, w_masked), _ITERS.value, _TIMER.value)}
      if _GRAD.value:
        times["forward+backward"] = _timed_pair(
            {name: _grad_of(op(p)) for name, p in (("masked", False), ("premasked", True))},
            _grad_of(lambda x, w: x @ w), (x, w_masked), _ITERS.value, _TIMER.value)
      itemsize = jnp.dtype(dtype).itemsize
      return {"case": "square", "shape": [rows, k, n], "density": density, "times": times,
              "baseline": "dense XLA x @ w", "rel_err": err,
              "weight_bytes": {"masked": weight_bytes(bsm, itemsize),
                               "premasked": weight_bytes(bsm, itemsize, True),
                               "baseline": k * n * itemsize}}
    yield measure


def _expert_rows(rng, dtype, densities, block, dry: bool) -> Iterator[Callable[[], dict]]:
  tokens, shapes, expert_counts = (DRY if dry else FULL)["experts"]
  itemsize = jnp.dtype(dtype).itemsize
  for num_experts in expert_counts:
    for k, n in shapes:
      for density in densities:
        def measure(num_experts=num_experts, k=k, n=n, density=density):
          x = jnp.asarray(rng.normal(size=(tokens, k)), dtype)
          ids = jnp.asarray(rng.integers(0, num_experts, tokens), jnp.int32)
          masks = np.stack([block_mask(rng, k, n, block, density) for _ in range(num_experts)])
          bsm = BlockSparseMask.from_masks(masks, block_shape=block)
          w = jnp.asarray(rng.normal(size=(num_experts, k, n)) / np.sqrt(k) * masks, dtype)
          op = lambda impl, premasked=False: lambda x, w: expert_matmul(  # noqa: E731
              x, ids, w, bsm, implementation=impl, block_m=_BLOCK_M.value,
              premasked=premasked)
          want = expert_matmul_reference(jnp.asarray(x, jnp.float32), ids,
                                         jnp.asarray(w, jnp.float32), masks)
          err = max(_rel_err(jax.jit(op("pallas", p))(x, w), want) for p in (False, True))
          dense = jax.jit(lambda x, w: x @ w[0])  # one dense FFN matmul over all tokens
          kernels = {"masked": jax.jit(op("pallas")), "premasked": jax.jit(op("pallas", True)),
                     "ragged_dot": jax.jit(op("xla"))}
          times = {"forward": _timed_pair(kernels, dense, (x, w), _ITERS.value, _TIMER.value)}
          return {"case": "experts", "experts": num_experts, "shape": [tokens, k, n],
                  "density": density, "times": times,
                  "baseline": "one dense XLA x @ w[0] over all tokens", "rel_err": err,
                  "weight_bytes": {"masked": weight_bytes(bsm, itemsize),
                                   "premasked": weight_bytes(bsm, itemsize, True),
                                   "baseline": k * n * itemsize}}
        yield measure


def _print_row(row: dict) -> None:
  label = row["case"] + (f" E={row['experts']}" if "experts" in row else "")
  label += " " + "x".join(map(str, row["shape"]))
  for direction, times in row["times"].items():
    base = times["baseline"]["s"]
    cells = "  ".join(f"{name} {t['s'] * 1e3:8.3f} ms ({base / t['s']:5.2f}x)"
                      for name, t in times.items() if name != "baseline")
    print(f"{label:<26} {row['density']:5.2f} {direction:<16} baseline {base * 1e3:8.3f} ms  "
          f"{cells}  ideal {1 / row['density']:5.2f}x  [{times['baseline']['timer']}]",
          flush=True)
  print(f"{'':<26} weight MiB: masked {row['weight_bytes']['masked'] / 2**20:.2f}, premasked "
        f"{row['weight_bytes']['premasked'] / 2**20:.2f}, dense "
        f"{row['weight_bytes']['baseline'] / 2**20:.2f}; rel err {row['rel_err']:.1e}",
        flush=True)


def main(argv) -> None:
  del argv
  common.validate("out", not os.path.exists(_OUT.value), "exists; name a new file")
  platform = jax.default_backend()
  dry = _DRY_RUN.value or platform == "cpu"
  dtype = jnp.float32 if platform == "cpu" else jnp.dtype(_DTYPE.value)
  block = DRY_BLOCK if dry else (_BLOCK_K.value, _BLOCK_N.value)
  densities = [float(d) for d in _DENSITIES.value]
  rng = np.random.default_rng(_SEED.value)
  header = {"jax": jax.__version__, "platform": platform,
            "device": jax.devices()[0].device_kind, "dry_run": dry,
            "dtype": jnp.dtype(dtype).name, "block_shape": list(block),
            "block_m": _BLOCK_M.value, "iters": _ITERS.value, "timer": _TIMER.value}
  print(" ".join(f"{k}={v}" for k, v in header.items()), flush=True)
  if platform == "cpu":
    print("CPU: the kernels run in the Pallas interpreter; a dry run at small shapes checks "
          "them and the timers. Timings need a GPU or TPU.", flush=True)
  rows = [m for case in _CASES.value
          for m in {"square": _square_rows, "experts": _expert_rows}[case](
              rng, dtype, densities, block, dry)]
  start = time.perf_counter()
  worst = 0.0
  with open(_OUT.value, "x") as out:
    out.write(json.dumps({"header": header}) + "\n")
    for done, measure in enumerate(rows):
      elapsed = time.perf_counter() - start
      if done and elapsed > _BUDGET.value:
        print(f"budget of {_BUDGET.value:.0f} s reached after {done} of {len(rows)} rows; "
              "the rest are skipped", flush=True)
        out.write(json.dumps({"skipped_rows": len(rows) - done, "after_s": elapsed}) + "\n")
        break
      row = measure()
      worst = max(worst, row["rel_err"])
      out.write(json.dumps(row) + "\n")
      out.flush()
      _print_row(row)
      rate = (time.perf_counter() - start) / (done + 1)
      print(f"  [{done + 1}/{len(rows)} rows, {rate:.1f} s/row, about "
            f"{rate * (len(rows) - done - 1):.0f} s left]", flush=True)
  tolerance = 1e-5 if dtype == jnp.float32 and platform == "cpu" else 2e-2
  print(f"worst relative error {worst:.1e} (tolerance {tolerance:.0e}): "
        f"{'OK' if worst < tolerance else 'FAILED'}; rows in {_OUT.value}")
  if worst >= tolerance:
    sys.exit(1)


if __name__ == "__main__":
  common.run(main)
