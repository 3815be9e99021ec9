"""The Boolean binary end to end, in subprocesses: a finished run, resume after kills, the
Pallas matmul, 8 devices (its bad input: tests/test_bad_inputs.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from binaries import ROOT, kill_in_every_first_save, log_keys, subprocess_env

TINY = ["--d=12", "--k=3", "--clauses=3", "--neurons=4", "--alphas=2",
        "--splits=dense,random,clause", "--seeds=2", "--train_size=256", "--test_size=256",
        "--batch_size=32", "--warmup_steps=100", "--steps=1200", "--chunk_steps=100"]


def _run(args, workdir, devices=1, **kw):
  return subprocess.run([sys.executable, "-m", "experiments.boolean", f"--workdir={workdir}",
                         *args], cwd=ROOT, env=subprocess_env(devices), capture_output=True,
                        text=True, **kw)


def _results_without_flags(workdir, name):
  with open(os.path.join(workdir, "boolean", name, "results.json")) as f:
    results = json.load(f)
  results.pop("flags")
  return results


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory):
  """The workdir of the tiny run, uninterrupted: the reference of every resume test."""
  workdir = tmp_path_factory.mktemp("clean")
  clean = _run(TINY + ["--run_name=tiny"], workdir, timeout=600)
  assert clean.returncode == 0, clean.stderr[-2000:]
  return workdir


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, clean_dir):
  killed_dir = tmp_path / "killed"
  log = killed_dir / "boolean" / "tiny" / "metrics.jsonl"
  args = TINY + ["--run_name=tiny"]
  proc = subprocess.Popen([sys.executable, "-m", "experiments.boolean",
                           f"--workdir={killed_dir}", *args], cwd=ROOT, env=subprocess_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  # Kill once the FPE phase (after warm-up and dense) has logged a few chunks.
  while time.time() < deadline and proc.poll() is None:
    if log.exists() and sum('"h4_alpha2"' in line for line in log.read_text().splitlines()) >= 3:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be killed; make it longer"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (killed_dir / "boolean" / "tiny" / "results.json").exists()

  resumed = _run(args, killed_dir, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "(resuming)" in resumed.stdout
  assert _results_without_flags(killed_dir, "tiny") == _results_without_flags(clean_dir, "tiny")
  # The log holds each chunk once, as an uninterrupted run's does.
  steps = [(r["phase"], r["step"]) for r in map(json.loads, log.read_text().splitlines())]
  assert len(steps) == len(set(steps))

  # flags.txt holds this binary's resolved flags and is re-usable as a flagfile.
  flags_txt = (clean_dir / "boolean" / "tiny" / "flags.txt").read_text().splitlines()
  assert set(TINY) <= set(flags_txt) and "--bias=copy" in flags_txt
  # results.json records the config the flags were read into.
  config = _results_without_flags(clean_dir, "tiny")["config"]
  assert config["clauses"] == [3] and config["sweep"]["widths"] == [4]
  assert config["sweep"]["arms"] == ["dense", "random", "clause"]

  # A finished run is not overwritten silently.
  before = (clean_dir / "boolean" / "tiny" / "results.json").read_text()
  again = _run(args, clean_dir)
  assert again.returncode != 0 and "--overwrite" in again.stderr
  assert (clean_dir / "boolean" / "tiny" / "results.json").read_text() == before
  for plot in ("accuracy_vs_clauses.png", "accuracy_vs_neurons.png", "metrics_vs_gain.png"):
    assert (clean_dir / "boolean" / "tiny" / "plots" / plot).stat().st_size > 1000


def test_killed_in_the_first_save_of_every_phase_resumes_to_the_same_results(tmp_path,
                                                                             clean_dir):
  killed_dir = tmp_path / "killed"
  result, killed, phases = kill_in_every_first_save(
      "experiments.boolean", [f"--workdir={killed_dir}", *TINY, "--run_name=tiny"],
      tmp_path / "kills.txt")
  assert result.returncode == 0, result.stderr[-2000:]
  run = killed_dir / "boolean" / "tiny"
  # Every phase (warm-up, dense, the FPE arms) was killed in its first save, and resumed.
  assert sorted(os.path.basename(p) for p in phases) == sorted(
      os.listdir(run / "checkpoints")) and killed == len(phases) >= 3
  assert _results_without_flags(killed_dir, "tiny") == _results_without_flags(clean_dir, "tiny")
  steps = log_keys(run / "metrics.jsonl", "phase", "step")
  assert len(steps) == len(set(steps)) == len(log_keys(
      clean_dir / "boolean" / "tiny" / "metrics.jsonl", "phase", "step"))


def test_pallas_matmul_trains_like_xla(tmp_path):
  """--matmul=pallas runs the FPE arms on the block-sparse kernel (interpret mode here)."""
  args = TINY + ["--splits=random", "--steps=300", "--run_name=tiny"]
  results = {}
  for matmul in ("xla", "pallas"):
    run = _run(args + [f"--matmul={matmul}"], tmp_path / matmul, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    results[matmul] = _results_without_flags(tmp_path / matmul, "tiny")["points"]
  for a, b in zip(results["xla"], results["pallas"], strict=True):
    assert a["split"] == b["split"]
    assert a["accuracy"]["per_seed"] == pytest.approx(b["accuracy"]["per_seed"], abs=1e-6)
    assert a["capacity"]["mean"] == pytest.approx(b["capacity"]["mean"], rel=1e-4)


# Dense and one split on 8 fake devices: the data-parallel and the 8-device resume checks.
# --steps stays TINY's, so the dense phase lasts long enough to be killed in.
EIGHT_DEVICE_ARGS = TINY + ["--splits=dense,random", "--run_name=tiny"]


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory):
  """The workdir of an uninterrupted 8-device run of EIGHT_DEVICE_ARGS."""
  workdir = tmp_path_factory.mktemp("eight_devices")
  run = _run(EIGHT_DEVICE_ARGS, workdir, devices=8, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  return workdir


def test_data_parallel_over_8_devices_gives_the_1_device_numbers(tmp_path, eight_device_run):
  """On a multi-device host each minibatch is split over the `data` mesh axis."""
  one = _run(EIGHT_DEVICE_ARGS, tmp_path, timeout=600)
  assert one.returncode == 0, one.stderr[-2000:]
  points = {}
  for devices, workdir in ((1, tmp_path), (8, eight_device_run)):
    results = _results_without_flags(workdir, "tiny")
    assert results["devices"] == devices
    points[devices] = results["points"]
  for a, b in zip(points[1], points[8], strict=True):
    assert (a["split"], a["nonzero"]) == (b["split"], b["nonzero"])
    # All-reduced gradients sum in another order: equal up to float rounding.
    assert a["accuracy"]["mean"] == pytest.approx(b["accuracy"]["mean"], abs=0.02)
    assert a["capacity"]["mean"] == pytest.approx(b["capacity"]["mean"], rel=1e-3)


def test_8_device_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_results(
    tmp_path, eight_device_run):
  """Restored states are replicated over the data mesh, as fresh ones are (no device clash)."""
  checkpoints = tmp_path / "boolean" / "tiny" / "checkpoints"
  proc = subprocess.Popen([sys.executable, "-m", "experiments.boolean", f"--workdir={tmp_path}",
                           *EIGHT_DEVICE_ARGS], cwd=ROOT, env=subprocess_env(8),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  # Kill once the warm-up is saved, within the dense phase (the same program, 12 chunks): the
  # resumed run restores a checkpoint and trains on from it.
  while (time.time() < deadline and proc.poll() is None
         and not (checkpoints / "h4_warmup" / "100").exists()):
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before it could be killed; make it longer"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert (checkpoints / "h4_warmup" / "100").exists()
  assert not (checkpoints / "h4_dense" / "1300").exists(), "killed too late: no restore to test"

  resumed = _run(EIGHT_DEVICE_ARGS, tmp_path, devices=8, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "(resuming)" in resumed.stdout
  killed = _results_without_flags(tmp_path, "tiny")
  assert killed["devices"] == 8
  assert killed == _results_without_flags(eight_device_run, "tiny")
