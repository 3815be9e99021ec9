"""The kernel benchmark's dry run (what CPU always runs): rows as JSONL, device-timer
parsing, the budget, and refused input. No timing is asserted: CPU times say nothing
about a GPU or TPU."""

import json
import subprocess
import sys

import pytest
from binaries import ROOT, assert_refused, subprocess_env

ARGS = ["--densities=0.5,0.25", "--iters=2"]


def _bench(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "kernels_pallas.bench", *args], cwd=ROOT,
                        env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def _records(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_dry_run_writes_every_row_with_profiler_times_and_exact_numbers(tmp_path):
  out = tmp_path / "bench.jsonl"
  result = _bench(f"--out={out}", *ARGS)
  assert result.returncode == 0, result.stderr[-3000:]
  header, *rows = _records(out)
  assert header["header"]["dry_run"] and header["header"]["platform"] == "cpu"
  assert [(r["case"], r["density"]) for r in rows] == [
      ("square", 0.5), ("square", 0.25), ("experts", 0.5), ("experts", 0.25)]
  for row in rows:
    assert row["rel_err"] < 1e-5
    for direction, times in row["times"].items():
      assert direction in ("forward", "forward+backward")
      assert set(times) >= {"baseline", "masked", "premasked"}
      for t in times.values():
        # The profiler found XLA:CPU's op events: the times are theirs, not wall clock.
        assert t["timer"] == "cpu ops" and 0 < t["s"] and t["kernels"]
    assert row["weight_bytes"]["premasked"] < row["weight_bytes"]["masked"]
  assert "forward+backward" in rows[0]["times"] and "ragged_dot" in rows[2]["times"]["forward"]
  assert "worst relative error" in result.stdout and "OK" in result.stdout


def test_budget_stops_before_the_next_row_and_records_the_skipped(tmp_path):
  out = tmp_path / "bench.jsonl"
  # A budget of 0 s: the first row always runs, and every later one is past the budget.
  # (With 1 s the test relied on the first row taking longer, which a warm compile cache
  # broke.)
  result = _bench(f"--out={out}", *ARGS, "--cases=square", "--nograd", "--budget_s=0")
  assert result.returncode == 0, result.stderr[-3000:]
  records = _records(out)
  assert len(records) == 3 and records[1]["case"] == "square"
  assert records[2]["skipped_rows"] == 1 and "budget of 0 s reached" in result.stdout


@pytest.mark.parametrize("flag,args", [
    ("--densities", ["--densities=0"]),
    ("--cases", ["--cases=square,cube"]),
    ("--block_k", ["--block_k=0"]),
    ("--iters", ["--iters=0"]),
    ("--seed", ["--seed=-1"]),
    ("--budget_s", ["--budget_s=nan"]),
    ("--budget_s", ["--budget_s=-1"]),
])
def test_bad_flags_are_refused_on_one_line_before_anything_is_written(tmp_path, flag, args):
  out = tmp_path / "bench.jsonl"
  assert_refused(_bench(f"--out={out}", *args), flag, out)


def test_an_existing_output_is_not_overwritten(tmp_path):
  out = tmp_path / "bench.jsonl"
  out.write_text("earlier rows\n")
  result = _bench(f"--out={out}", *ARGS)
  assert result.returncode != 0 and result.stderr.strip().startswith("error: --out")
  assert out.read_text() == "earlier rows\n"
