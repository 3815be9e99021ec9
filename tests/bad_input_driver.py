"""Runs many command lines of one binary in one process, as `python -m` would run each.

  python tests/bad_input_driver.py experiments.boolean cases.json out.json

cases.json is a list of argument lists (without the program name); out.json gets, for
each, {"status": exit status, "stderr": what it wrote to stderr}. Each command line is
parsed afresh (`FLAGS.unparse_flags()`) and run through the binary's own entry point,
`common.parse_flags` then `common.guard(main)`: exactly what `common.run` hands to
`app.run`. An exception that escapes is printed as Python would (a traceback, status 1).

Why one process: the bad-input tables hold ~20 cases per binary, and a fresh interpreter
costs seconds of imports per case; tests/test_bad_inputs.py also runs one case per binary
through a real `python -m` to prove the entry point is the same.
"""

import contextlib
import importlib
import io
import json
import signal
import sys
import time
import traceback

from absl import flags

CASE_SECONDS = 60  # a bad input is refused in well under a second; past this it was accepted


class CaseTimeout(BaseException):  # not an Exception: `common.guard` must not catch it
  pass


def _timeout(signum, frame):
  raise CaseTimeout(f"still running after {CASE_SECONDS} s: the input was accepted")


def run_case(module, args: list[str]) -> dict:
  from experiments import common
  flags.FLAGS.unparse_flags()
  stderr, stdout = io.StringIO(), io.StringIO()
  status = 0
  signal.signal(signal.SIGALRM, _timeout)
  signal.alarm(CASE_SECONDS)
  start = time.perf_counter()
  with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
    try:
      argv = common.parse_flags([module.__name__, *args])
      common.guard(module.main)(argv)
    except SystemExit as e:
      status = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 -- reported as the interpreter would
      traceback.print_exc()
      status = 1
    finally:
      signal.alarm(0)
  # Progress for whoever watches (pytest shows it on failure).
  print(f"status {status} in {time.perf_counter() - start:.1f} s: {' '.join(args)[-150:]}",
        file=sys.stderr, flush=True)
  return {"status": status, "stderr": stderr.getvalue()}


def main() -> None:
  module_name, cases_path, out_path = sys.argv[1:]
  module = importlib.import_module(module_name)
  with open(cases_path) as f:
    cases = json.load(f)
  results = [run_case(module, args) for args in cases]
  with open(out_path, "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main()
