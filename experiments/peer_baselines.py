"""The peers' own torch code, timed in a separate virtualenv, for the benchmarks' ratios.

fpe_jax never imports torch. A benchmark given `--torch_python=/path/to/venv/bin/python`
(a virtualenv with torch, numpy, transformers, gguf and accelerate) runs
scripts/torch_baselines.py with it, on the same machine and inputs, and reads back the one
JSON object it prints (seconds per repeat, their median, versions). README.md, "Speed
against the peers' code", says how to make that virtualenv and where the official code
comes from.
"""

from __future__ import annotations

import json
import os
import subprocess

from experiments import common

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                      "torch_baselines.py")


def is_python(path: str) -> bool:
  """Whether --torch_python names an executable file ('' counts: no torch baseline)."""
  return not path or (os.path.isfile(path) and os.access(path, os.X_OK))


def run(torch_python: str, command: str, **args) -> dict:
  """Runs `torch_baselines.py <command> --<key>=<value>...` with `torch_python`.

  Raises:
    common.UsageError: naming --torch_python when it is not an executable or the script
      fails (its last stderr line is quoted).
  """
  if not (torch_python and is_python(torch_python)):
    raise common.UsageError(f"--torch_python: {torch_python!r} is not an executable python")
  argv = [torch_python, SCRIPT, command, *(f"--{k}={v}" for k, v in args.items())]
  result = subprocess.run(argv, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
    raise common.UsageError(f"--torch_python: {command} baseline failed: {last}")
  return json.loads(result.stdout.strip().splitlines()[-1])
