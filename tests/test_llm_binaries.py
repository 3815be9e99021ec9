"""The SmolLM2 binaries end to end on one block and a few short windows: a tiny run, and a
run SIGKILLed after its first finished configuration, resumed to the same rows."""

import json
import subprocess
import sys

import pytest
from binaries import ROOT, kill_after_logged, subprocess_env

TINY = ["--layers=0", "--calib_windows=4", "--calib_window=64", "--eval_windows=2",
        "--eval_window=64", "--kmeans_restarts=2", "--kmeans_iters=5", "--run_name=tiny"]
RUNS = {
    "sparse_expansion": TINY + ["--methods=dense,sparsegpt,sparse_expansion",
                                "--sparsities=0.5", "--n_m=2:4", "--num_experts=2"],
    "wasserstein": TINY + ["--criteria=random", "--num_experts=2"],
}


def _run(binary, workdir):
  return subprocess.run([sys.executable, "-m", f"experiments.{binary}", f"--workdir={workdir}",
                         *RUNS[binary]], cwd=ROOT, env=subprocess_env(), capture_output=True,
                        text=True, timeout=900)


VARYING = ("seconds", "peak_rss_mb", "plots")


def _figures(results):
  """results.json without what differs between identical runs (times, memory, flags, and
  the plots' paths, which name the workdir)."""
  def strip(tree):
    if isinstance(tree, dict):
      return {k: strip(v) for k, v in tree.items() if k not in VARYING}
    if isinstance(tree, list):
      return [strip(v) for v in tree]
    return tree
  return strip({k: v for k, v in results.items() if k != "flags"})


@pytest.mark.parametrize("binary", sorted(RUNS))
def test_killed_after_a_configuration_resumes_to_the_uninterrupted_results(tmp_path, binary):
  clean = _run(binary, tmp_path / "clean")
  assert clean.returncode == 0, clean.stderr[-3000:]
  want = json.loads((tmp_path / "clean" / binary / "tiny" / "results.json").read_text())

  run = tmp_path / "killed" / binary / "tiny"
  kill_after_logged(f"experiments.{binary}", [f"--workdir={tmp_path / 'killed'}",
                                              *RUNS[binary]], run / "metrics.jsonl", 1)
  assert not (run / "results.json").exists()
  resumed = _run(binary, tmp_path / "killed")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "(resuming)" in resumed.stdout
  got = json.loads((run / "results.json").read_text())
  assert _figures(got) == _figures(want)
  names = [json.loads(line).get("name") for line in
           (run / "metrics.jsonl").read_text().splitlines()]
  assert len(names) == len(set(names))  # each configuration logged once
