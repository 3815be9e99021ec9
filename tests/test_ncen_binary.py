"""The NCEn binary end to end, in subprocesses: a tiny run, refusal, resume, and
the same training on a `data` x `member` mesh of 8 fake CPU devices, resumed there too."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from binaries import ROOT, kill_in_every_first_save, subprocess_env

TINY = ["--dataset=mnist5k", "--width=2", "--hidden=8", "--num_members=2", "--methods=ncen",
        "--batch_size=16", "--train_steps=4", "--chunk_steps=2", "--eps=0.3", "--large_eps=1.0",
        "--n_eval=20", "--eval_batch_size=20", "--clean_eval_size=100", "--targets=ensemble",
        "--attack_losses=ce", "--attacks=pgd,fgsm", "--pgd_steps=3", "--pgd_restarts=1",
        "--steps_check=1", "--run_name=tiny"]


def _run(args, workdir, devices=1):
  return subprocess.run([sys.executable, "-m", "experiments.ncen", f"--workdir={workdir}",
                         *args], cwd=ROOT, env=subprocess_env(devices), capture_output=True,
                        text=True, timeout=600)


def _training_records(run):
  return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
          if "step" in r]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """The tiny run on one device: (its workdir, the subprocess result, its training records
  as first written)."""
  workdir = tmp_path_factory.mktemp("one_device")
  result = _run(TINY, workdir)
  records = _training_records(workdir / "ncen" / "tiny") if result.returncode == 0 else None
  return workdir, result, records


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory):
  """The tiny run on 8 fake devices, members over `member` (2), minibatches over `data` (4):
  (its workdir, the subprocess result, its training records and results as first written)."""
  workdir = tmp_path_factory.mktemp("eight_devices")
  result = _run(TINY + ["--member_devices=2"], workdir, devices=8)
  run = workdir / "ncen" / "tiny"
  done = result.returncode == 0
  records = _training_records(run) if done else None
  results = json.loads((run / "results.json").read_text()) if done else None
  return workdir, result, records, results


def _without_timings(tree):
  if isinstance(tree, dict):
    return {k: _without_timings(v) for k, v in tree.items() if k != "seconds"}
  return tree


def test_failed_check_is_flagged_when_found_at_the_end_and_in_results(tmp_path):
  # At eps 0 the "large eps" attacks (PGD and the single-step FGSM) cannot lower accuracy,
  # so with a zero threshold both checks must fail (the barely trained tiny model gets 11
  # of the 100 stratified clean images right; all of them are attacked here, so some
  # survive). At the check eps 0.3 every attack takes accuracy to 0, so the others pass.
  result = _run(TINY + ["--large_eps=0", "--large_eps_threshold=0", "--n_eval=100",
                        "--eval_batch_size=100", "--run_name=masked"], tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((tmp_path / "ncen" / "masked" / "results.json").read_text())
  failed = ["ncen/large_eps_accuracy_near_zero", "ncen/large_eps_single_step_accuracy_near_zero"]
  assert results["failed_checks"] == failed
  assert not results["all_checks_passed"]
  for item in failed:
    warning = f"WARNING: gradient-masking check FAILED: {item}\n"
    assert result.stderr.count(warning) == 2  # when ncen's evaluation ends, and at the end


def test_tiny_run_then_refuse_then_resume(tiny_run):
  workdir, first, _ = tiny_run
  assert first.returncode == 0, first.stderr[-3000:]
  run = workdir / "ncen" / "tiny"
  results = json.loads((run / "results.json").read_text())
  # Evaluation progress: one line per attack run (PGD on the one objective, FGSM,
  # black-box, transfer).
  assert "evaluate ncen: 4/4 attacks (100%)" in first.stdout
  assert results["config"]["mesh"] == {"data": 1, "member": 1}
  assert results["config"]["loss"]["member_map"] == "unroll"  # the default on one CPU device
  assert results["config"]["attack"]["objectives"] == [
      {"target": "ensemble", "loss": "ce", "member": None}]
  assert {k: results["config"]["attack"][k] for k in (
      "pgd_schedule", "step_fraction", "masking_check_tolerance")} == {
          "pgd_schedule": "apgd", "step_fraction": 2.0, "masking_check_tolerance": 0.02}
  ncen = results["methods"]["ncen"]
  assert set(ncen["checks"]["passed"]) >= {"large_eps_accuracy_near_zero",
                                           "large_eps_single_step_accuracy_near_zero",
                                           "pgd_not_weaker_than_fgsm",
                                           "finer_steps_do_not_lower_accuracy",
                                           "transfer_not_stronger_than_white_box"}
  inputs = ncen["checks"]["inputs"]
  # Refinement 1 is the single-restart run at --pgd_steps=3, 2 the one at half the step.
  assert set(inputs["accuracy_by_refinement"]) == {"1", "2"}
  assert inputs["accuracy_by_refinement"]["1"] == inputs["accuracy_by_steps"]["3"]
  assert 0 <= inputs["large_eps_single_step_accuracy"] <= 1
  assert results["all_checks_passed"] == (not results["failed_checks"])
  robust = ncen["robust"]["0.3"]
  assert 0 <= robust["white_box"] <= min(robust["fgsm"], robust["pgd_ensemble_ce"])
  assert len(robust["transfer"]["member_to_member"]) == 2
  assert (run / "plots" / "robust_accuracy_vs_eps.png").exists()
  assert (run / "plots" / "transfer_matrices.png").exists()
  assert "ncen" in (run / "table.txt").read_text()

  again = _run(TINY, workdir)
  assert again.returncode != 0 and "is finished" in again.stderr

  # Unfinished run: training resumes from its final checkpoints, evaluation is redone.
  (run / "results.json").unlink()
  shutil.rmtree(run / "evals")
  resumed = _run(TINY, workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "(resuming)" in resumed.stdout and "train ncen" not in resumed.stdout
  again_results = json.loads((run / "results.json").read_text())
  assert _without_timings(again_results["methods"]) == _without_timings(results["methods"])
  steps = [(r["method"], r["step"]) for r in _training_records(run)]
  assert len(steps) == len(set(steps)) == 4  # surrogate and ncen, two chunks each


def test_trained_from_evaluates_another_runs_ensembles_under_another_harness(tiny_run,
                                                                             tmp_path):
  workdir, first, _ = tiny_run
  assert first.returncode == 0, first.stderr[-3000:]
  source = workdir / "ncen" / "tiny"
  result = _run(TINY + ["--run_name=reeval", "--pgd_steps=5", "--steps_check=2",
                        "--methods=ncen,independent", f"--trained_from={source}"], tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"surrogate: restored from {source / 'checkpoints' / 'surrogate'}" in result.stdout
  assert "ncen: restored from" in result.stdout and "train ncen" not in result.stdout
  assert "train independent" in result.stdout  # the source has no such ensemble
  run = tmp_path / "ncen" / "reeval"
  assert not (run / "checkpoints" / "ncen").exists()
  assert (run / "checkpoints" / "independent").exists()
  ours = json.loads((run / "results.json").read_text())["methods"]["ncen"]
  theirs = json.loads((source / "results.json").read_text())["methods"]["ncen"]
  # The same ensemble, under the other harness.
  assert ours["clean_accuracy"] == theirs["clean_accuracy"]
  assert ours["member_clean_accuracy"] == theirs["member_clean_accuracy"]
  for key in ("mean_pairwise_cosine", "mean_grad_norm"):
    assert ours[key] == pytest.approx(theirs[key], rel=1e-6)
  assert set(ours["checks"]["inputs"]["accuracy_by_steps"]) == {"2", "5"}

  # A training flag changed, or a folder that holds no run: one line naming the flag, and
  # no run directory written.
  for args, message in [([f"--trained_from={source}", "--learning_rate=0.5"],
                         r"--trained_from=.*other values of --learning_rate"),
                        ([f"--trained_from={tmp_path / 'nowhere'}"],
                         r"--trained_from=.*no flags.txt there")]:
    refused = _run(TINY + ["--run_name=refused", *args], tmp_path)
    assert refused.returncode != 0
    assert re.search(message, refused.stderr.strip().splitlines()[-1]), refused.stderr[-2000:]
    assert not (tmp_path / "ncen" / "refused").exists()

  # Two sources, the first that has a phase wins; the second is a run from before a flag
  # existed, where the flag counts at its default.
  old = tmp_path / "old_run"
  shutil.copytree(source, old)
  flags_txt = (old / "flags.txt").read_text()
  assert "--noncen_smoothness\n" in flags_txt
  (old / "flags.txt").write_text(flags_txt.replace("--noncen_smoothness\n", ""))
  from_old = TINY + [f"--trained_from={run},{old}", "--run_name=from_old",
                     "--methods=independent,ncen"]
  result = _run(from_old, tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"independent: restored from {run / 'checkpoints' / 'independent'}" in result.stdout
  for phase in ("surrogate", "ncen"):
    assert f"{phase}: restored from {old / 'checkpoints' / phase}" in result.stdout
  assert "train " not in result.stdout
  refused = _run(from_old + ["--run_name=from_old_smooth", "--ncen_smoothness",
                             "--trs_plus_adv=false"], tmp_path)
  assert refused.returncode != 0
  last_line = refused.stderr.strip().splitlines()[-1]
  assert "other values of --ncen_smoothness, --trs_plus_adv" in last_line


def test_eight_devices_data_by_member_mesh_trains_as_one_device(eight_device_run, tiny_run):
  """8 fake devices, members over `member` (2), each minibatch over `data` (8 / 2 = 4)."""
  _, first, want = tiny_run
  assert first.returncode == 0, first.stderr[-3000:]
  _, result, got, results = eight_device_run
  assert result.returncode == 0, result.stderr[-3000:]
  assert "mesh: data 4 x member 2 (cpu), members applied by vmap" in result.stdout
  assert results["config"]["mesh"] == {"data": 4, "member": 2}
  assert [(r["method"], r["step"]) for r in got] == [(r["method"], r["step"]) for r in want]
  for g, w in zip(got, want, strict=True):
    for name in ("loss", "ce", "cosine", "grad_norm"):
      if name in w:
        assert g[name] == pytest.approx(w[name], rel=1e-4, abs=1e-6), (g, w)


def test_eight_devices_killed_after_first_checkpoint_resume_to_the_same_figures(
    eight_device_run):
  """Restored leaves land on their template's devices: the step and the optimiser's count
  too must be on the mesh, or the resumed chunk mixes device sets."""
  workdir, first, want_records, want = eight_device_run
  assert first.returncode == 0, first.stderr[-3000:]
  # The run as a SIGKILL right after its first save leaves it: the surrogate's step-2
  # checkpoint, and its step-4 chunk logged but not saved (the resume drops that record).
  run = workdir / "ncen" / "tiny"
  for path in (run / "results.json", run / "table.txt"):
    path.unlink()
  for folder in (run / "evals", run / "checkpoints" / "surrogate" / "4",
                 run / "checkpoints" / "ncen"):
    shutil.rmtree(folder)
  metrics = (run / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in metrics[:2]] == [2, 4]
  (run / "metrics.jsonl").write_text("\n".join(metrics[:2]) + "\n")

  resumed = _run(TINY + ["--member_devices=2"], workdir, devices=8)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "(resuming)" in resumed.stdout
  got = json.loads((run / "results.json").read_text())
  assert _without_timings(got["methods"]) == _without_timings(want["methods"])
  strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]
  assert strip(_training_records(run)) == strip(want_records)


def test_killed_in_the_first_save_of_every_phase_resumes_to_the_same_figures(tmp_path,
                                                                             tiny_run):
  """SIGKILLed inside (or just after) the first checkpoint save of the surrogate and of
  ncen, resumed each time: the figures and the log of an uninterrupted run."""
  _, first, want_records = tiny_run
  assert first.returncode == 0, first.stderr[-3000:]
  workdir = tmp_path / "killed"
  result, killed, phases = kill_in_every_first_save(
      "experiments.ncen", [f"--workdir={workdir}", *TINY], tmp_path / "kills.txt")
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.path.basename(p) for p in phases) == ["ncen", "surrogate"] and killed == 2
  run, want_run = workdir / "ncen" / "tiny", tiny_run[0] / "ncen" / "tiny"
  got = json.loads((run / "results.json").read_text())
  want = json.loads((want_run / "results.json").read_text())
  assert _without_timings(got["methods"]) == _without_timings(want["methods"])
  strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]
  assert strip(_training_records(run)) == strip(want_records)
