"""Every committed flagfile parses with its binary's flags and passes their validators.

The paper flagfiles are too long to run in CI; this at least keeps them in step with the
binaries (a renamed or re-validated flag fails here, not hours into an accelerator run).
A binary with a `config_from_flags()` (flags -> frozen config, with the checks across
flags; no data, no files) has it run on each flagfile too. One subprocess per binary:
absl's flags are process-global.
"""

import collections
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG_DIR = os.path.join(ROOT, "experiments", "flags")
BINARIES = ("boolean", "deep", "embeddings", "ncen", "sparse_expansion", "wasserstein")


def _binary(stem: str) -> str:
  """The binary a flagfile belongs to: the longest binary name that prefixes `<name>_`."""
  owners = [b for b in BINARIES if stem.startswith(b + "_")]
  if not owners:
    raise AssertionError(f"flagfile {stem}.flags names no binary in {BINARIES}")
  return max(owners, key=len)


def _flagfiles_by_binary() -> dict[str, list[str]]:
  grouped = collections.defaultdict(list)
  for name in sorted(os.listdir(FLAG_DIR)):
    if name.endswith(".flags"):
      grouped[_binary(name[: -len(".flags")])].append(os.path.join(FLAG_DIR, name))
  return dict(grouped)


PARSE = """
import importlib, sys
from absl import flags
binary = importlib.import_module("experiments." + sys.argv[1])
for path in sys.argv[2:]:
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["binary", "--flagfile=" + path])
  if hasattr(binary, "config_from_flags"):
    binary.config_from_flags()
"""


def test_every_binary_has_a_quick_and_a_paper_flagfile():
  grouped = _flagfiles_by_binary()
  for binary in BINARIES:
    stems = {os.path.basename(p) for p in grouped.get(binary, [])}
    assert {f"{binary}_quick.flags", f"{binary}_paper.flags"} <= stems, binary


@pytest.mark.parametrize("binary, paths", sorted(_flagfiles_by_binary().items()))
def test_flagfiles_parse_and_validate(binary, paths):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, "-c", PARSE, binary, *paths], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
