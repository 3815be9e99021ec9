"""Compares two runs' results.json figure by figure, timings aside: the refactoring check.

  python scripts/compare_results.py BEFORE_DIR AFTER_DIR

Each DIR is a `--workdir`: every `<experiment>/<run_name>/results.json` under BEFORE_DIR
is compared with the same path under AFTER_DIR. Measurements of the machine (keys naming
seconds, rates, tokens/s or memory) and the run's own record of its flags and config are
left out, and paths inside each workdir are compared relative to it; every other value
must be bit-identical. Prints one line per run and exits 1 on any difference.
"""

import glob
import json
import os
import sys

IGNORED_KEYS = ("flags", "config")
MEASUREMENT_KEYS = ("seconds", "elapsed", "wall")
MEASUREMENT_SUFFIXES = ("_seconds", "_per_s", "_per_second", "_rss_mb", "_wall_s")


def _is_measurement(key: str) -> bool:
  """Exact names and suffixes only: `per_seed` or `learning_rate` are figures, not timings."""
  return key in MEASUREMENT_KEYS or key.endswith(MEASUREMENT_SUFFIXES)


def _load(path: str, workdir: str):
  """A results.json with the workdir's absolute path replaced by `<workdir>`."""
  with open(path) as f:
    text = f.read()
  return json.loads(text.replace(os.path.abspath(workdir), "<workdir>"))


def differences(before, after, path: str = "") -> list[str]:
  """The paths at which two JSON values differ (measurements and IGNORED_KEYS skipped)."""
  if isinstance(before, dict) and isinstance(after, dict):
    out = []
    for key in sorted(set(before) | set(after)):
      if key in IGNORED_KEYS or _is_measurement(key):
        continue
      if key not in before or key not in after:
        out.append(f"{path}/{key}: only in {'after' if key in after else 'before'}")
      else:
        out += differences(before[key], after[key], f"{path}/{key}")
    return out
  if isinstance(before, list) and isinstance(after, list):
    if len(before) != len(after):
      return [f"{path}: {len(before)} vs {len(after)} entries"]
    return [d for i, (b, a) in enumerate(zip(before, after, strict=True)) for d in
            differences(b, a, f"{path}[{i}]")]
  return [] if before == after else [f"{path}: {before!r} vs {after!r}"]


def main(before_dir: str, after_dir: str) -> int:
  paths = sorted(glob.glob(os.path.join(before_dir, "*", "*", "results.json")))
  if not paths:
    print(f"error: no <experiment>/<run>/results.json under {before_dir}", file=sys.stderr)
    return 2
  failed = False
  for before_path in paths:
    rel = os.path.relpath(before_path, before_dir)
    after_path = os.path.join(after_dir, rel)
    if not os.path.exists(after_path):
      print(f"MISSING {rel}")
      failed = True
      continue
    diff = differences(_load(before_path, before_dir), _load(after_path, after_dir))
    print(f"{'IDENTICAL' if not diff else 'DIFFERENT'} {rel}"
          + "".join(f"\n  {d}" for d in diff[:20]))
    failed |= bool(diff)
  return int(failed)


if __name__ == "__main__":
  if len(sys.argv) != 3:
    print("usage: python scripts/compare_results.py BEFORE_DIR AFTER_DIR", file=sys.stderr)
    sys.exit(2)
  sys.exit(main(*sys.argv[1:]))
