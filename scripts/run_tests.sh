#!/usr/bin/env bash
# The whole test run of the README's second command: the suite on this Python (3.11,
# jax 0.10.2), then scripts/test_newest_jax.sh (Python 3.12, jax 0.12: its install, then
# the library, kernel and compile tests). One after the other: run side by side on 2
# cores, they were no faster and the Ctrl-C test timed out under the double load.
# Fails if either fails; the newest-jax job runs even when the first suite failed.
# Each suite runs on FPE_JAX_TEST_WORKERS pytest-xdist workers (default 2, one per CI core),
# a test file per worker at a time (--dist loadfile), so a file's module fixtures (e.g.
# test_bad_inputs.py's per-binary tables of refused runs) are made once.
set -uo pipefail
cd "$(dirname "$0")/.."
export FPE_JAX_TEST_WORKERS="${FPE_JAX_TEST_WORKERS:-2}"

python -m pytest -q -n "$FPE_JAX_TEST_WORKERS" --dist loadfile
main_status=$?
bash scripts/test_newest_jax.sh 2>&1 | grep -v "^WARNING: Location"
newest_status=${PIPESTATUS[0]}
echo "[run_tests] Python 3.11 suite: exit $main_status; newest jax (Python 3.12): exit $newest_status"
[ "$main_status" -eq 0 ] && [ "$newest_status" -eq 0 ]
