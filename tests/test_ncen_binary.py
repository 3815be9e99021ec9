"""The NCEn binary end to end, in subprocesses: bad flags, a tiny run, refusal, resume."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset=mnist5k", "--width=2", "--hidden=8", "--num_members=2", "--methods=ncen",
        "--batch_size=16", "--train_steps=4", "--chunk_steps=2", "--eps=0.3", "--large_eps=1.0",
        "--n_eval=20", "--eval_batch_size=20", "--clean_eval_size=100", "--targets=ensemble",
        "--attack_losses=ce", "--attacks=pgd,fgsm", "--pgd_steps=3", "--pgd_restarts=1",
        "--steps_check=1", "--run_name=tiny"]


def _env():
  # No persistent compile cache: the one flaky failure seen here was with it, so each run
  # compiles afresh, as a user's would.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)  # one device, like a user's laptop run
  return env


def _run(args, workdir):
  return subprocess.run([sys.executable, "-m", "experiments.ncen", f"--workdir={workdir}",
                         *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=600)


@pytest.mark.parametrize("args, flag", [
    (["--eps=0.1,-0.05"], "--eps"),
    (["--large_eps=-1"], "--large_eps"),
    (["--methods=ncen,dverge"], "--methods"),
    (["--attacks=pgd,cw"], "--attacks"),
    (["--attack_losses=hinge"], "--attack_losses"),
    (["--num_members=1", "--methods=independent,gal"], "--num_members"),
    (["--eval_batch_size=7"], "--eval_batch_size"),
])
def test_bad_flags_fail_on_one_line_and_write_nothing(tmp_path, args, flag):
  workdir = tmp_path / "runs"
  result = _run(TINY + args, workdir)
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("error: ") and flag in lines[0], lines[0]
  assert not workdir.exists()


def _without_timings(tree):
  if isinstance(tree, dict):
    return {k: _without_timings(v) for k, v in tree.items() if k != "seconds"}
  return tree


def test_failed_check_is_flagged_when_found_at_the_end_and_in_results(tmp_path):
  # At eps 0 the "large eps" attack cannot lower accuracy, so with a zero threshold the
  # check must fail (the barely trained tiny model gets 5 of its 20 points right).
  result = _run(TINY + ["--large_eps=0", "--large_eps_threshold=0", "--run_name=masked"],
                tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((tmp_path / "ncen" / "masked" / "results.json").read_text())
  assert results["failed_checks"] == ["ncen/large_eps_accuracy_near_zero"]
  assert not results["all_checks_passed"]
  warning = "WARNING: gradient-masking check FAILED: ncen/large_eps_accuracy_near_zero"
  assert result.stderr.count(warning) == 2  # when ncen's evaluation ends, and at the end


def test_tiny_run_then_refuse_then_resume(tmp_path):
  run = tmp_path / "ncen" / "tiny"
  first = _run(TINY, tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  results = json.loads((run / "results.json").read_text())
  ncen = results["methods"]["ncen"]
  assert set(ncen["checks"]["passed"]) >= {"large_eps_accuracy_near_zero",
                                           "pgd_not_weaker_than_fgsm",
                                           "transfer_not_stronger_than_white_box"}
  assert results["all_checks_passed"] == (not results["failed_checks"])
  robust = ncen["robust"]["0.3"]
  assert 0 <= robust["white_box"] <= min(robust["fgsm"], robust["pgd_ensemble_ce"])
  assert len(robust["transfer"]["member_to_member"]) == 2
  assert (run / "plots" / "robust_accuracy_vs_eps.png").exists()
  assert (run / "plots" / "transfer_matrices.png").exists()
  assert "ncen" in (run / "table.txt").read_text()

  again = _run(TINY, tmp_path)
  assert again.returncode != 0 and "is finished" in again.stderr

  # Unfinished run: training resumes from its final checkpoints, evaluation is redone.
  (run / "results.json").unlink()
  shutil.rmtree(run / "evals")
  resumed = _run(TINY, tmp_path)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "(resuming)" in resumed.stdout and "train ncen" not in resumed.stdout
  again_results = json.loads((run / "results.json").read_text())
  assert _without_timings(again_results["methods"]) == _without_timings(results["methods"])
  steps = [(r["method"], r["step"]) for r in map(json.loads,
                                                 (run / "metrics.jsonl").read_text().splitlines())
           if "step" in r]
  assert len(steps) == len(set(steps)) == 4  # surrogate and ncen, two chunks each
