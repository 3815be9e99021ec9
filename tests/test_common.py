"""The run directory under faults and odd input: locks, location-free resume, safe deletes,
damaged logs and checkpoints (experiments.common, fpe_jax.checkpoint)."""

import json
import os
import signal
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from binaries import ROOT, assert_refused, subprocess_env

from experiments import common
from fpe_jax import checkpoint, train

FLAGS = flags.FLAGS
if not FLAGS.is_parsed():
  FLAGS.mark_as_parsed()


def _open(workdir, run_name="r", **kw):
  with flagsaver.flagsaver(workdir=str(workdir), run_name=run_name, **kw):
    return common.RunDir("exp", common.__name__).open()


def test_resume_ignores_how_the_workdir_is_spelled(tmp_path):
  first = _open(tmp_path)
  assert not first.resumed
  first.release()  # the first process has ended
  again = _open(f"{tmp_path}/")
  assert again.resumed
  assert common.scientific_flags("--workdir=/x\n--seed=1\n--nomultihost\n") == "--seed=1\n"


def test_a_second_process_on_the_same_run_is_refused(tmp_path):
  held = _open(tmp_path)  # holds the lock, as a running binary does
  with pytest.raises(common.UsageError, match="in use by another process"):
    _open(tmp_path)
  held.release()
  assert _open(tmp_path).resumed


def test_overwrite_never_deletes_outside_the_workdir(tmp_path):
  outside = tmp_path / "precious"
  outside.mkdir()
  (outside / "results.json").write_text("{}")
  workdir = tmp_path / "runs"
  (workdir / "exp").mkdir(parents=True)
  os.symlink(outside, workdir / "exp" / "r")
  with pytest.raises(common.UsageError, match="not inside --workdir"):
    _open(workdir, overwrite=True)
  assert (outside / "results.json").exists()


def test_a_workdir_that_is_a_file_is_named(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(common.UsageError, match="--workdir: .* is a file"):
    _open(tmp_path / "file")


def test_unreadable_log_lines_are_dropped_with_a_warning(tmp_path, capsys):
  run = _open(tmp_path)
  good = [{"phase": "p", "step": 10}, {"phase": "p", "step": 20}]
  with open(os.path.join(run.path, "metrics.jsonl"), "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in good) + '{"phase": "p", "st')
  run.drop_logs_after(lambda r: r["step"] <= 10)
  with open(os.path.join(run.path, "metrics.jsonl")) as f:
    assert [json.loads(line) for line in f] == good[:1]
  assert "dropped 1 unreadable line" in capsys.readouterr().err


def test_a_damaged_checkpoint_falls_back_to_the_previous_step(tmp_path, capsys):
  store = checkpoint.Checkpoints(str(tmp_path / "ckpt"))
  like = {"w": jnp.zeros((3,))}
  store.save(1, {"w": jnp.ones((3,))})
  store.save(2, {"w": jnp.full((3,), 2.0)})
  for root, _, files in os.walk(tmp_path / "ckpt" / "2"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\0garbage")
  step, state = store.restore_latest(like)
  store.close()
  assert step == 1
  np.testing.assert_array_equal(state["w"], np.ones(3))
  assert "checkpoint step 2" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["../../escaped", "a/b", ".."])
def test_run_names_that_leave_the_workdir_are_refused(tmp_path, name):
  workdir = tmp_path / "runs"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.boolean", f"--workdir={workdir}",
       f"--run_name={name}", "--steps=10", "--chunk_steps=10", "--warmup_steps=0"],
      cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert_refused(result, "--run_name", workdir)
  assert not (tmp_path / "escaped").exists()


def test_a_non_finite_loss_stops_the_phase_before_it_is_saved(tmp_path):
  run = _open(tmp_path)
  state = train.TrainState(params={"w": jnp.zeros((2,))}, opt_state=(),
                           step=jnp.zeros((2,), jnp.int32))

  def chunk(s):  # two vmapped runs, 5 steps a chunk; the second diverges in the second chunk
    s = s._replace(step=s.step + 5)
    return s, {"loss": jnp.where(s.step > 5, jnp.asarray([0.1, jnp.nan]), 0.2)}

  with pytest.raises(common.DivergedError, match=r"not finite by step 10 \(runs \[1\]\)"):
    common.train_phase(run, "p", state, chunk, end_step=20, chunk_steps=5,
                       progress=common.Progress("p", 20))
  with open(os.path.join(run.path, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [5]
  assert checkpoint.Checkpoints(os.path.join(run.checkpoints, "p")).latest_step() == 5


def test_time_calls_times_a_first_call_then_each_repeat_and_returns_the_last_output():
  calls = []

  def fn():
    calls.append(len(calls))
    return jnp.full((2,), len(calls))

  first, times, out = common.time_calls(fn, 3)
  assert calls == [0, 1, 2, 3] and len(times) == 3
  assert first >= 0 and all(t >= 0 for t in times)
  np.testing.assert_array_equal(out, [4, 4])
  assert common.time_calls(fn, 0)[1] == []


_LONG_BOOLEAN = ["--d=12", "--k=3", "--clauses=3", "--neurons=4", "--alphas=2", "--seeds=1",
                 "--train_size=256", "--test_size=256", "--batch_size=32", "--warmup_steps=0",
                 "--steps=400000", "--chunk_steps=100"]


def _start_boolean(workdir):
  """The long Boolean run these tests interrupt, compiling afresh: its stderr is counted."""
  return subprocess.Popen(
      [sys.executable, "-m", "experiments.boolean", f"--workdir={workdir}", *_LONG_BOOLEAN],
      cwd=ROOT, env=subprocess_env(compile_cache=None), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def _wait_for_progress(proc):
  for line in proc.stdout:  # the first progress line: a chunk is trained and saved
    if line.startswith("boolean:"):
      return
  raise AssertionError(proc.stderr.read())


def test_ctrl_c_is_one_line_and_the_run_resumes(tmp_path):
  proc = _start_boolean(tmp_path / "runs")
  _wait_for_progress(proc)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: interrupted"), err
  run = tmp_path / "runs" / "boolean" / "boolean"
  assert (run / "checkpoints").is_dir() and not (run / "results.json").exists()


def _mount_tmpfs(path, size: str) -> str | None:
  """Mounts a tmpfs of `size` at `path`; None if it did, else why not."""
  path.mkdir()
  try:
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
  except FileNotFoundError:
    return "no mount command"
  return None if done.returncode == 0 else f"cannot mount a tmpfs: {done.stderr.strip()}"


def test_a_full_disk_stops_on_one_line_and_keeps_the_last_checkpoint(tmp_path):
  disk = tmp_path / "disk"
  why_not = _mount_tmpfs(disk, "320k")
  if why_not:
    pytest.skip(why_not)
  try:
    proc = _start_boolean(disk)
    out, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 1, err[-2000:]
    assert len(lines) == 1 and "disk is full" in lines[0], err[-2000:]
    store = checkpoint.Checkpoints(str(disk / "boolean" / "boolean" / "checkpoints" / "h4_dense"))
    assert (store.latest_step() or 0) >= 100, out[-2000:]  # a finished, earlier step
    store.close()
  finally:
    subprocess.run(["umount", str(disk)], check=False)
