"""experiments.deep end to end on a tiny slice of Fashion-MNIST: both tasks (bad input:
tests/test_bad_inputs.py)."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--tasks=mlp,cnn", "--depth=2", "--cnn_channels=2", "--train_size=512",
        "--widths=4", "--alphas=2", "--arms=dense,random", "--dense_ratios=",
        "--seeds=1", "--warmup_steps=10", "--steps=10", "--chunk_steps=10",
        "--batch_size=16"]


def _run(args, tmp_path):
  return subprocess.run(
      [sys.executable, "-m", "experiments.deep", f"--workdir={tmp_path / 'runs'}", *args],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


def test_tiny_run(tmp_path):
  result = _run(TINY, tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  run_dir = tmp_path / "runs" / "deep" / "deep"
  results = json.loads((run_dir / "results.json").read_text())
  for task in ("mlp", "cnn"):
    points = {(p["arm"], p["alpha"]): p for p in results["points"] if p["task"] == task}
    assert set(points) == {("dense", 1), ("random", 2)}
    assert points[("random", 2)]["nonzero"] == points[("dense", 1)]["nonzero"]
    assert points[("random", 2)]["head_width"] == 8
    assert 0.0 <= points[("random", 2)]["accuracy"]["mean"] <= 1.0
    assert results["tasks"][task]["test"] == 10000
  # The deep MLP expands both hidden layers: metrics for each of them.
  mlp_random = next(p for p in results["points"] if p["task"] == "mlp" and p["arm"] == "random")
  assert mlp_random["nonzero"] == 784 * 4 + 4 + 4 * 4 + 4 + 4 * 10 + 10
  cnn_dense = next(p for p in results["points"] if p["task"] == "cnn" and p["arm"] == "dense")
  conv = (9 * 1 * 2 + 2) + (9 * 2 * 4 + 4)
  assert cnn_dense["nonzero"] == conv + 7 * 7 * 4 * 4 + 4 + 4 * 10 + 10
  assert sorted(os.listdir(run_dir / "plots")) == ["cnn_accuracy_vs_width.png",
                                                  "mlp_accuracy_vs_width.png"]
