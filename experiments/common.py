"""What every experiment binary shares: the run directory, the checkpointed phase loop
(`train_phase`), flag errors, list parsers, config records, progress lines, atomic JSON.

Run directory (WORKSPACE.md): `<workdir>/<experiment>/<run_name>/` holding
  flags.txt      the resolved flags of this binary, re-usable as a --flagfile;
  metrics.jsonl  one JSON object per trained chunk (or other logged unit of work);
  results.json   the final figures (written last, atomically: its presence means done);
  plots/*.png;
  checkpoints/   orbax checkpoints, for resume.
A finished run (results.json present) is never overwritten silently: the binary refuses
unless --overwrite. An unfinished one is resumed from its checkpoints when started again
with the same flags, and refused if the flags differ.
"""

import contextlib
import dataclasses
import decimal
import errno
import fcntl
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from fpe_jax import checkpoint

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", "runs", "Root folder of run directories.")
flags.DEFINE_string("run_name", None, "Run directory name, one path component (default: the "
                    "experiment name).")
flags.DEFINE_bool("overwrite", False, "Delete a finished or mismatching run directory (its "
                  "checkpoints, logs and results) and start it again.")
# Where a run lives is not part of what it computes: resume compares the other flags.
LOCATION_FLAGS = ("workdir", "run_name", "multihost")
flags.DEFINE_bool("multihost", False,
                  "Call jax.distributed.initialize() first (multi-host TPU pods / GPU clusters).")


class UsageError(Exception):
  """A bad flag or argument: reported as one line naming it, exit status 2."""


class DivergedError(Exception):
  """Training went non-finite: reported as one line naming the phase and step, exit 1."""


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run` with flag and usage errors reported on one line and a non-zero exit."""
  app.run(guard(main), flags_parser=parse_flags)


def parse_flags(argv: list[str]) -> list[str]:
  """Parses argv into FLAGS; a flag error is one line and exit status 2."""
  try:
    argv = FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])
  try:
    _check_every_flag()
  except UsageError as e:
    _fail(str(e))
  return argv


def _check_every_flag() -> None:
  """The checks every binary's every flag gets, whatever its own validators say: an
  integer fits in 64 bits (numpy and jax overflow past it), a float is finite (absl's
  bounds let NaN through: every comparison with it is False), a list has no empty and no
  repeated entries, nor one number spelled twice ("2,2.0": a repeated
  sweep point would run twice and write one row over the other)."""
  for flag in {id(f): f for f in FLAGS._flags().values()}.values():
    value = flag.value
    if isinstance(flag.parser, flags.IntegerParser) and value is not None:
      validate(flag.name, -2**63 <= value < 2**63, f"{value} does not fit in 64 bits")
    if isinstance(flag.parser, flags.FloatParser) and value is not None:
      validate(flag.name, math.isfinite(value), f"must be a finite number, got {value}")
    if isinstance(flag.parser, flags.ListParser) and value:
      validate(flag.name, all(v.strip() for v in value),
               f"has an empty entry in {','.join(value)!r}")
      repeated = sorted({v for v in value if value.count(v) > 1})
      validate(flag.name, not repeated, f"lists {', '.join(repeated)} more than once")
      numbers = float_list(value)
      if numbers is not None and len(set(numbers)) < len(numbers):
        same = [v for v, x in zip(value, numbers, strict=True) if numbers.count(x) > 1]
        validate(flag.name, False, f"lists one number twice ({', '.join(same)})")


def guard(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """`main` with bad input (UsageError) reported as one line and exit 2, divergence as one
  line and exit 1, Ctrl-C and a full disk as one line; any other error keeps its
  traceback (it is a bug, not the user's input)."""

  def guarded(argv):
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
      main(argv)
    except UsageError as e:
      _fail(str(e))
    except DivergedError as e:
      _fail(str(e), status=1)
    except KeyboardInterrupt:
      _quit("interrupted; run the same command again to resume from the last checkpoint",
            status=130)
    except Exception as e:
      if _disk_full(e):
        _quit("the disk is full; free space and run the same command again to resume from "
              "the last checkpoint, which is intact", status=1)
      raise

  return guarded


def _fail(message: str, status: int = 2) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


def _quit(message: str, status: int) -> None:
  """Reports and exits at once: an interpreter shutdown in the middle of orbax's threads
  buries the message under hundreds of "Event loop is closed" lines. Saves are synchronous,
  so nothing that was reported saved is lost."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(status)


def _disk_full(error: BaseException | None) -> bool:
  """Whether `error`, or one it was raised from, is a full disk: an OSError with ENOSPC, or
  tensorstore's (orbax's) RESOURCE_EXHAUSTED that carries the OS message."""
  while error is not None:
    if ((isinstance(error, OSError) and error.errno == errno.ENOSPC)
        or os.strerror(errno.ENOSPC) in str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False


def validate(flag: str, ok: bool, message: str) -> None:
  """Raises a one-line UsageError `--flag: message` unless ok (checks across flags)."""
  if not ok:
    raise UsageError(f"--{flag}: {message}")


def flag_validator(name: str, check: Callable, message: str) -> None:
  """absl validator that rejects at parse time, before anything is written."""
  flags.register_validator(name, check, message=f"--{name}: {message}")


# jax.random.key keeps 32 bits of a seed without x64: key(2**32) is key(0).
SEED_LIMIT = 2**32


def seed_validator(name: str) -> None:
  """Refuses a seed flag outside [0, 2**32): negative (numpy refuses it) or one that
  jax.random.key would silently alias to a smaller seed."""
  flag_validator(name, lambda v: 0 <= v < SEED_LIMIT, f"must be in [0, {SEED_LIMIT - 1}]")


@contextlib.contextmanager
def blame(flag: str, *errors: type[Exception]):
  """Reports a library's `errors` (default ValueError and FileNotFoundError) raised inside
  as bad input to `--flag` (one line, exit 2). Wrap only calls whose errors can come from
  that flag's value: an error the user cannot fix by changing it is a bug and keeps its
  traceback."""
  caught = errors or (ValueError, FileNotFoundError)
  try:
    yield
  except caught as e:
    raise UsageError(f"--{flag}: {e}") from e


@contextlib.contextmanager
def packaged_data():
  """Reports packaged data or readers that are not installed (FileNotFoundError or
  ImportError from `fpe_jax.data`, whose messages name scripts/install_data.sh) as one
  line, exit 2: no flag's fault."""
  try:
    yield
  except (FileNotFoundError, ImportError) as e:
    raise UsageError(f"data not installed: {e}") from e


def _single_component(name: str | None) -> bool:
  return name is None or (name not in ("", ".", "..") and "/" not in name
                          and os.sep not in name and "\0" not in name)


flag_validator("run_name", _single_component,
               "must be one folder name (no '/', not '.' or '..'), inside --workdir")


def maybe_initialize_distributed() -> None:
  if FLAGS.multihost:
    jax.distributed.initialize()


# ------------------------------------------------------------------ flags and configs


def int_list(values: Sequence[str]) -> list[int] | None:
  """A comma-list flag's values as ints, or None if one is not an integer."""
  try:
    return [int(v) for v in values]
  except ValueError:
    return None


def float_list(values: Sequence[str]) -> list[float] | None:
  """A comma-list flag's values as floats, or None if one is not a finite number."""
  try:
    numbers = [float(v) for v in values]
  except ValueError:
    return None
  return numbers if all(map(math.isfinite, numbers)) else None


def number_label(x: float) -> str:
  """A number as a name (a sweep point's label, its checkpoint folder): the shortest
  decimal that round-trips, so distinct numbers never share a name ("%g" gives 1.2 for
  1.2 and 1.2000001). 2.0 -> "2", 1.2 -> "1.2", 0.504 -> "0.504"."""
  return format(decimal.Decimal(repr(float(x))).normalize(), "f")


def percent_label(x: float) -> str:
  """A fraction as an exact percentage label: 0.5 -> "50%", 0.504 -> "50.4%"."""
  return format((decimal.Decimal(repr(float(x))) * 100).normalize(), "f") + "%"


def config_record(config) -> dict:
  """A frozen config dataclass as plain JSON-able data (for results.json)."""
  def plain(value):
    if hasattr(value, "_asdict"):  # a NamedTuple config (cnn.CNNConfig, ensemble.LossConfig)
      return plain(value._asdict())
    if isinstance(value, tuple | list):
      return [plain(v) for v in value]
    if isinstance(value, dict):
      return {str(k): plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
      return config_record(value)
    return value
  return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def resolved_flags(module_name: str) -> str:
  """This binary's own flags and the shared run flags, one `--name=value` per line."""
  # absl files the flags of a module run as `python -m` under its script path.
  key = sys.argv[0] if module_name == "__main__" else module_name
  by_module = FLAGS.flags_by_module_dict()
  owned = by_module.get(key, []) + by_module[__name__]
  lines = sorted({f.serialize() for f in owned if f.name != "overwrite"} - {""})
  return "\n".join(lines) + "\n"


def scientific_flags(flags_text: str) -> str:
  """A flags.txt without the flags that only say where the run lives (LOCATION_FLAGS)."""
  location = set(LOCATION_FLAGS) | {f"no{name}" for name in LOCATION_FLAGS}
  name = lambda line: line.removeprefix("--").split("=", 1)[0].strip()
  return "".join(line for line in flags_text.splitlines(keepends=True)
                 if name(line) not in location)


class RunDir:
  """A run directory: create or resume it, log metrics, write results atomically.

  While a binary runs in it, the run is locked (an flock on `.<run_name>.lock` beside
  it, released when the process exits): a second command on the same run refuses on
  one line instead of interleaving its logs and checkpoints with the first's.
  """

  def __init__(self, experiment: str, module_name: str):
    self.experiment = experiment
    self.path = os.path.join(FLAGS.workdir, experiment, FLAGS.run_name or experiment)
    self.flags_text = resolved_flags(module_name)
    self.resumed = False
    self._lock_fd = None

  @property
  def checkpoints(self) -> str:
    return os.path.join(self.path, "checkpoints")

  @property
  def plots(self) -> str:
    return os.path.join(self.path, "plots")

  def check(self) -> "RunDir":
    """Refuses, writing nothing, what `open` would refuse: a --workdir that is a file, a
    finished run, or one with other flags (unless --overwrite). Binaries call it before
    their slow setup (data, embeddings, models), so a refusal comes at once."""
    for folder in (FLAGS.workdir, os.path.dirname(self.path), self.path):
      if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f"--workdir: {folder} is a file, not a folder")
    if os.path.exists(self.path) and not FLAGS.overwrite:
      self._refuse_existing()
    return self

  def _refuse_existing(self) -> None:
    finished = os.path.exists(os.path.join(self.path, "results.json"))
    same_flags = (scientific_flags(read_text(os.path.join(self.path, "flags.txt")))
                  == scientific_flags(self.flags_text))
    if finished:
      raise UsageError(f"run {self.path} is finished; pass --overwrite to delete it (its "
                       "checkpoints, logs and results) and run it again, or another "
                       "--run_name")
    if not same_flags:
      raise UsageError(
          f"run {self.path} exists with other flags (see its flags.txt); pass another "
          "--run_name, or --overwrite to delete it (its checkpoints, logs and results)")

  def open(self) -> "RunDir":
    """Creates the directory, or resumes/refuses an existing one (see module doc)."""
    self.check()
    self._make_parent()
    self._lock()
    if os.path.exists(self.path):
      if FLAGS.overwrite:
        self._delete()
      else:
        self._refuse_existing()  # again: it may have changed while this process waited
        self.resumed = True
    os.makedirs(self.plots, exist_ok=True)
    write_text(os.path.join(self.path, "flags.txt"), self.flags_text)
    return self

  def _make_parent(self) -> None:
    try:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
    except OSError as e:
      raise UsageError(f"--workdir: cannot create {os.path.dirname(self.path)}: "
                       f"{e.strerror}") from None

  def _lock(self) -> None:
    parent, name = os.path.split(self.path)
    fd = os.open(os.path.join(parent, f".{name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise UsageError(f"--run_name: run {self.path} is in use by another process; wait "
                       "for it to finish or pass another --run_name") from None
    self._lock_fd = fd  # held until release() or the process exits

  def release(self) -> None:
    """Releases the run's lock (a binary need not: its process ending does)."""
    if self._lock_fd is not None:
      os.close(self._lock_fd)
      self._lock_fd = None

  def _delete(self) -> None:
    """Deletes this run's directory (never anything outside --workdir)."""
    workdir = os.path.realpath(FLAGS.workdir)
    target = os.path.realpath(self.path)
    if os.path.commonpath([workdir, target]) != workdir or target == workdir:
      raise UsageError(f"--run_name: {self.path} is not inside --workdir={FLAGS.workdir}; "
                       "refusing to delete it")
    shutil.rmtree(target)

  def resume(self, phase: str, state, *, first_step: int = 0, log_key: str = "phase"):
    """Opens the orbax checkpoints of `phase` and restores the newest one, if any.

    Args:
      phase: the phase's name (its checkpoint folder and its log records' `log_key`).
      state: the phase's initial state (also the structure to restore into).
      first_step: the step `state` is at.
      log_key: the log field naming the phase.

    Returns:
      (store, state, start): `start` is the step the returned state is at (the newest
      checkpoint that restores; a damaged one is skipped, see
      `checkpoint.Checkpoints.restore_latest`). The log records of this phase past
      `start` are dropped, so a resumed run logs every chunk once.
    """
    store = checkpoint.Checkpoints(os.path.join(self.checkpoints, phase))
    step, restored = store.restore_latest(state)
    start = first_step
    if step is not None and step > first_step:
      state, start = restored, step
    # Chunks are logged before they are saved: a run killed in between logged a chunk that
    # it will train again. Drop it, whether or not a checkpoint was restored.
    self.drop_logs_after(lambda r: r.get(log_key) != phase or r.get("step", 0) <= start)
    return store, state, start

  def log(self, record: dict) -> None:
    with open(os.path.join(self.path, "metrics.jsonl"), "a") as f:
      f.write(json.dumps(record) + "\n")

  def drop_logs_after(self, keep: Callable[[dict], bool]) -> None:
    """On resume: keeps only the metrics lines `keep` accepts (those up to a checkpoint)."""
    path = os.path.join(self.path, "metrics.jsonl")
    if not os.path.exists(path):
      return
    records, unreadable = [], 0
    with open(path) as f:
      for line in f:
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill or a full disk
          unreadable += bool(line.strip())
    if unreadable:
      print(f"warning: {path}: dropped {unreadable} unreadable line(s)", file=sys.stderr)
    write_text(path, "".join(json.dumps(r) + "\n" for r in records if keep(r)))

  def write_results(self, results: dict) -> str:
    path = os.path.join(self.path, "results.json")
    write_text(path, json.dumps(results, indent=2, sort_keys=True) + "\n")
    return path


def read_text(path: str, default: str = "") -> str:
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return f.read()


def write_text(path: str, text: str) -> None:
  """Writes atomically: a temporary file in the same folder, then a rename."""
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_")
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.replace(tmp, path)


class Progress:
  """Prints `label: step i/n (p%), rate steps/s, elapsed, ETA` lines for long loops.

  `done` counts the work done so far; `skip` counts work restored from a checkpoint (done,
  but not in the rate), `advance` work done now.
  """

  def __init__(self, label: str, total: int, start: int = 0, unit: str = "steps"):
    self.label, self.total, self.start, self.unit = label, max(total, 1), start, unit
    self.done = start
    self.t0 = time.perf_counter()

  def skip(self, amount: int) -> None:
    self.done += amount
    self.start += amount

  def advance(self, amount: int, extra: str = "") -> str:
    self.done += amount
    return self.update(self.done, extra)

  def update(self, done: int, extra: str = "") -> str:
    elapsed = time.perf_counter() - self.t0
    rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
    eta = (self.total - done) / rate if rate > 0 else float("nan")
    rate_text = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"  # slow work: 0.0067 runs/s
    line = (f"{self.label}: {done}/{self.total} {self.unit} ({100 * done / self.total:.0f}%), "
            f"{rate_text} {self.unit}/s, elapsed {_clock(elapsed)}, ETA {_clock(eta)}"
            + (f"  {extra}" if extra else ""))
    print(line, flush=True)
    return line


def time_calls(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
  """Wall-clock seconds of `fn()`, its outputs waited on (`jax.block_until_ready`).

  Returns:
    (the first call's seconds, compile included; the seconds of each of `repeats` later
    calls; the last call's output). Benchmarks report the median or the best of the list.
  """
  def timed():
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out

  first, out = timed()
  times = []
  for _ in range(repeats):
    seconds, out = timed()
    times.append(seconds)
  return first, times, out


def _clock(seconds: float) -> str:
  if seconds != seconds:  # NaN: no rate yet
    return "?"
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ------------------------------------------------------------------------ phase loop


def train_phase(run_dir: RunDir, phase: str, state, chunk_fn: Callable, *args,
                end_step: int, chunk_steps: int, progress: Progress,
                log_key: str = "phase"):
  """The checkpointed phase loop of every binary that trains.

  Resumes `phase` from its newest checkpoint (or starts at `state.step`), then calls
  `state, metrics = chunk_fn(state, *args)` (a jitted `train.make_train_chunk`, vmapped
  over runs or not) until `end_step`; after each chunk it checks that the loss
  (`metrics["loss"]`) is finite (else `DivergedError`, nothing logged or saved for that
  chunk), logs one metrics.jsonl record, saves the state and prints a progress line.

  Args:
    run_dir: the open run directory.
    phase: the phase's name: its checkpoint folder and the `log_key` field of its records.
    state: a `train.TrainState` (its `step` a scalar, or one entry per vmapped run, all
      equal); also the structure checkpoints restore into.
    chunk_fn: advances the state by `chunk_steps` steps; it may donate its input (the
      caller's `state` is copied first).
    *args: the chunk's other arguments (data, keys, per-run loss arguments).
    end_step: the step the phase ends at; `end_step - state.step` must be a multiple of
      `chunk_steps`.
    chunk_steps: steps per call.
    progress: advanced by every chunk (restored chunks count as skipped).
    log_key: the record field that names the phase.

  Returns:
    The state at `end_step`.

  Log records: `{log_key: phase, "step", <metric>: value}` for a single run, or
  `{..., "runs": R, "<metric>_mean", "<metric>_max"}` over R vmapped runs, plus "seconds"
  since the phase (re)started.
  """
  first = int(np.asarray(state.step).reshape(-1)[0])
  if (end_step - first) % chunk_steps:
    raise ValueError(f"phase {phase}: {end_step - first} steps are not a multiple of "
                     f"chunk_steps={chunk_steps}")
  store, state, start = run_dir.resume(phase, state, first_step=first, log_key=log_key)
  progress.skip(start - first)
  state = jax.tree.map(jnp.copy, state)  # the chunks may donate their input: keep the caller's
  t0 = time.perf_counter()
  for step in range(start + chunk_steps, end_step + 1, chunk_steps):
    state, metrics = chunk_fn(state, *args)
    check_finite(phase, step, metrics["loss"])
    summary = summarize_metrics(metrics)
    run_dir.log({log_key: phase, "step": step, **summary,
                 "seconds": round(time.perf_counter() - t0, 3)})
    store.save(step, state)
    means = {k: v for k, v in summary.items() if not k.endswith("_max") and k != "runs"}
    progress.advance(chunk_steps, f"[{phase} " + " ".join(
        f"{k.removesuffix('_mean')} {v:.4f}" for k, v in sorted(means.items())) + "]")
  store.close()
  return state


def check_finite(phase: str, step: int, loss) -> None:
  """Stops a run whose loss went NaN or infinite, before that chunk is logged or saved."""
  loss = np.asarray(loss)
  if not np.all(np.isfinite(loss)):
    runs = np.flatnonzero(~np.isfinite(loss.reshape(-1))).tolist()
    raise DivergedError(
        f"phase {phase}: the loss is not finite by step {step}"
        + (f" (runs {runs})" if loss.ndim else "")
        + "; the last checkpoint holds the state before it (check the learning rate and "
        "the loss weights)")


def summarize_metrics(metrics: dict) -> dict:
  """Scalars as floats; per-run vectors [R] as `runs`, `<name>_mean` and `<name>_max`."""
  out = {}
  for name, value in metrics.items():
    value = np.asarray(value)
    if value.ndim == 0:
      out[name] = float(value)
    else:
      out["runs"] = int(value.shape[0])
      out[f"{name}_mean"] = float(value.mean())
      out[f"{name}_max"] = float(value.max())
  return out
