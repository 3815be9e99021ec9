"""What the binaries' end-to-end tests share: the subprocess environment and the refusal check."""

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The persistent compilation caches of the session's binaries, under the folder that
# conftest.py makes for the session ($FPE_JAX_TEST_COMPILE_CACHE). The end-to-end tests run
# the same tiny programs dozens of times, and compiling them afresh in every process was
# most of their time; a cached executable is the one a fresh compile would build (the
# tests' results are bit-equal either way). A process the tests interrupt gets a cache of
# its own: jax writes an entry in place, so a kill mid-write can leave a truncated one,
# which later readers report on stderr (and recompile), harmless only where no test
# counts stderr's lines.
COMPILE_CACHES = ("shared", "interrupted")


def subprocess_env(devices: int = 1, compile_cache: str | None = "shared") -> dict:
  """A binary's environment: CPU, the repository importable, `devices` CPU devices, and
  the session's `compile_cache` (one of COMPILE_CACHES; None: compile everything afresh).

  tests/conftest.py fakes 8 devices for this process; a binary gets one unless asked
  (like a user's laptop run).
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  root = env.pop("FPE_JAX_TEST_COMPILE_CACHE", "")
  if compile_cache is not None and root:
    assert compile_cache in COMPILE_CACHES, compile_cache
    env.update(JAX_COMPILATION_CACHE_DIR=os.path.join(root, compile_cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def assert_refused(result, flag: str, workdir) -> None:
  """Bad input: a non-zero exit, one `error: ...` line on stderr naming `flag`, nothing
  written under `workdir`."""
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("error: ") and flag in lines[0], lines[0]
  assert not os.path.exists(workdir)


# Runs a binary (argv[1], a module) with `fpe_jax.checkpoint.Checkpoints.save` wrapped:
# the first save of a phase that has no checkpoint yet, and was not killed before (the
# phases in $KILL_LOG), arms a SIGKILL of the whole process a random 0..$KILL_WINDOW_S
# seconds later, so the kill lands inside that save or just after it (with $KILL_AFTER_SAVE,
# right after the save is complete). A save that comes while a kill is armed waits for it,
# so each run kills exactly one phase: one logged.
_KILL_IN_FIRST_SAVE = """
import os, random, runpy, signal, sys, threading
from fpe_jax import checkpoint
real_save = checkpoint.Checkpoints.save
armed = threading.Event()
def save(self, step, tree):
  if armed.is_set():
    threading.Event().wait()
  phase = str(self._manager.directory)
  with open(os.environ["KILL_LOG"], "a+") as f:
    f.seek(0)
    fresh = self.latest_step() is None and phase not in f.read().splitlines()
    if fresh:
      f.write(phase + "\\n")
  if fresh and os.environ.get("KILL_AFTER_SAVE"):
    real_save(self, step, tree)
    os.kill(os.getpid(), signal.SIGKILL)
  if fresh:
    delay = random.Random(phase).uniform(0, float(os.environ["KILL_WINDOW_S"]))
    armed.set()
    threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
  return real_save(self, step, tree)
checkpoint.Checkpoints.save = save
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def kill_in_every_first_save(module: str, args: list[str], kill_log, *, window_s: float = 0.2,
                             after_save: bool = False, max_runs: int = 20, timeout: int = 600):
  """Runs `module` again and again until it finishes, each run SIGKILLed in (or just after)
  the first checkpoint save of a phase not killed before; with `after_save`, as soon as
  that save is complete (so the rerun must resume from it).

  Returns:
    (the finished run's CompletedProcess, the number of runs killed, the phases killed).
  """
  env = dict(subprocess_env(compile_cache="interrupted"), KILL_LOG=str(kill_log),
             KILL_WINDOW_S=str(window_s))
  if after_save:
    env["KILL_AFTER_SAVE"] = "1"
  killed = 0
  for _ in range(max_runs):
    result = subprocess.run([sys.executable, "-c", _KILL_IN_FIRST_SAVE, module, *args],
                            cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != -signal.SIGKILL:
      phases = open(kill_log).read().split() if os.path.exists(kill_log) else []
      return result, killed, phases
    killed += 1
  raise AssertionError(f"{module} was still unfinished after {max_runs} killed runs")


def log_keys(metrics_jsonl, *fields) -> list[tuple]:
  """The `fields` of every metrics.jsonl record that has them (duplicates kept)."""
  records = map(json.loads, open(metrics_jsonl).read().splitlines())
  return [tuple(r[f] for f in fields) for r in records if all(f in r for f in fields)]


def kill_after_logged(module: str, args: list[str], metrics_jsonl, records: int,
                      timeout: float = 600) -> None:
  """Starts `module` and SIGKILLs it once its metrics.jsonl holds `records` lines."""
  proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT,
                          env=subprocess_env(compile_cache="interrupted"),
                          stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + timeout
  while proc.poll() is None and time.time() < deadline:
    if (os.path.exists(metrics_jsonl)
        and len(open(metrics_jsonl).read().splitlines()) >= records):
      break
    time.sleep(0.05)
  if proc.poll() is not None:
    raise AssertionError(f"{module} ended (status {proc.returncode}) before it logged "
                         f"{records} records: {proc.stderr.read()[-2000:]}")
  proc.kill()
  proc.wait()
