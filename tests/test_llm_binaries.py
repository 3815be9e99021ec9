"""The SmolLM2 binaries end to end on one block and a few short windows: a tiny run, a run
SIGKILLed after its first finished configuration, resumed to the same rows, and the saved
compressed models evaluated again by experiments.lm_eval in a fresh process."""

import json
import shutil
import subprocess
import sys

import pytest
from binaries import ROOT, kill_after_logged, kill_in_every_first_save, subprocess_env

from experiments import compressed_models

TINY = ["--calib_windows=4", "--calib_window=64", "--eval_windows=2", "--eval_window=64",
        "--kmeans_restarts=2", "--kmeans_iters=5", "--run_name=tiny"]
RUNS = {  # two compressed blocks for sparse_expansion, so a kill can land between them
    "sparse_expansion": TINY + ["--layers=0,1", "--methods=dense,sparsegpt,sparse_expansion",
                                "--sparsities=0.5", "--n_m=2:4", "--num_experts=2",
                                "--save_models"],
    "wasserstein": TINY + ["--layers=0", "--criteria=random", "--num_experts=2"],
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


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
  """binary -> the run folder of its uninterrupted tiny run (run once per binary)."""
  runs = {}

  def run(binary):
    if binary not in runs:
      workdir = tmp_path_factory.mktemp(f"clean_{binary}")
      result = _run(binary, workdir)
      assert result.returncode == 0, result.stderr[-3000:]
      runs[binary] = workdir / binary / "tiny"
    return runs[binary]
  return run


def _saved_perplexities(run_dir):
  """{model folder: the perplexity its model.json records} of a --save_models run."""
  return {folder.name: json.loads((folder / "model.json").read_text())["perplexity"]
          for folder in (run_dir / "models").iterdir()}


@pytest.mark.parametrize("binary", sorted(RUNS))
def test_killed_after_a_configuration_resumes_to_the_uninterrupted_results(tmp_path, binary,
                                                                          clean_run):
  want = json.loads((clean_run(binary) / "results.json").read_text())

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
  if binary == "sparse_expansion":  # every configuration's model, saved before and after
    assert _saved_perplexities(run) == _saved_perplexities(clean_run(binary))


def test_killed_between_blocks_resumes_at_the_next_block_to_the_same_perplexity(tmp_path,
                                                                             clean_run):
  """SIGKILL right after the first block's state is saved; the rerun resumes after block 1
  of 2 and reports (and saves) the perplexity of the uninterrupted run, to the bit."""
  name = "sparse_expansion/50%/K=2"
  want = {r["name"]: r for r in json.loads(
      (clean_run("sparse_expansion") / "results.json").read_text())["rows"]}[name]
  args = [f"--workdir={tmp_path}", *RUNS["sparse_expansion"], "--methods=sparse_expansion",
          "--n_m="]
  result, killed, phases = kill_in_every_first_save(
      "experiments.sparse_expansion", args, tmp_path / "kills", after_save=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert killed == 1 and phases[0].endswith(compressed_models.folder_name(name))
  assert f"{name}: resuming after block 1/2" in result.stdout
  run = tmp_path / "sparse_expansion" / "tiny"
  got = json.loads((run / "results.json").read_text())["rows"]
  assert [(r["name"], r["perplexity"], r["ffn_bytes"]) for r in got] == [
      (name, want["perplexity"], want["ffn_bytes"])]
  folder = compressed_models.folder_name(name)
  assert _saved_perplexities(run) == {folder: want["perplexity"]}
  record = lambda run: json.loads((run / "models" / folder / "model.json").read_text())  # noqa: E731
  assert record(run)["arrays_sha256"] == record(clean_run("sparse_expansion"))["arrays_sha256"]
  assert not (run / "checkpoints" / folder).exists()


def _lm_eval(*args):
  return subprocess.run([sys.executable, "-m", "experiments.lm_eval", *args], cwd=ROOT,
                        env=subprocess_env(), capture_output=True, text=True, timeout=900)


def test_a_saved_model_reloads_in_a_fresh_process_to_the_reported_perplexity(tmp_path,
                                                                             clean_run):
  run = clean_run("sparse_expansion")
  rows = {r["name"]: r for r in json.loads((run / "results.json").read_text())["rows"]}
  assert _saved_perplexities(run) == {
      compressed_models.folder_name(name): row["perplexity"] for name, row in rows.items()}
  model = run / "models" / compressed_models.folder_name("sparse_expansion/50%/K=2")
  out = tmp_path / "eval.json"
  result = _lm_eval(f"--model={model}", "--num_tokens=4", "--timing", "--timing_repeats=1",
                    f"--out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  figures = json.loads(out.read_text())
  # The same float, not a close one: the same blocks, batches and compiled steps.
  assert figures["perplexity"] == rows["sparse_expansion/50%/K=2"]["perplexity"]
  assert "equal" in result.stdout and len(figures["continuation_tokens"]) == 4
  assert figures["continuation"].strip()
  for name in ("model", "dense"):  # measured, not asserted: timings are the bench's business
    assert figures["timing"][name]["prefill_tokens_per_s"] > 0
    assert figures["timing"][name]["decode_tokens_per_s"] > 0


def test_a_bad_saved_model_is_refused_on_one_line(tmp_path, clean_run):
  model = clean_run("sparse_expansion") / "models" / "sparsegpt__50pct"
  copy = tmp_path / "copy"
  shutil.copytree(model, copy)
  other_base = tmp_path / "other_base"
  shutil.copytree(model, other_base)
  record = json.loads((other_base / "model.json").read_text())
  record["base_model"]["sha256"] = "0" * 64
  (other_base / "model.json").write_text(json.dumps(record))
  # Truncate the largest file of the orbax checkpoint.
  largest = max((p for p in (copy / "ffns").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
  for args, flag, words in [
      ([f"--model={tmp_path / 'nowhere'}"], "--model", "not a saved model"),
      ([f"--model={other_base}"], "--model", "another base model"),
      ([f"--model={copy}"], "--model", "damaged"),
      ([f"--model={model}", f"--model_path={tmp_path / 'no.gguf'}"], "--model_path", "not a"),
      ([f"--model={model}", f"--out={copy / 'model.json'}"], "--out", "exists"),
      ([f"--model={model}", "--timing_repeats=0"], "--timing_repeats", "must be >= 1"),
  ]:
    result = _lm_eval(*args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr[-2000:]
    # The flag is named (absl's own validators word it "error: flag --x=v: --x: ...").
    assert lines[0].startswith("error: ") and flag in lines[0] and words in lines[0], lines[0]
