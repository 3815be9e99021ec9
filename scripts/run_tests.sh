#!/usr/bin/env bash
# The whole test run of the README's second command: the suite on this Python (3.11,
# jax 0.10.2) and, at the same time, scripts/test_newest_jax.sh (Python 3.12, jax 0.12:
# its install, then the library, kernel and compile tests). On 2 cores the two overlap
# well (pip downloads, XLA compiles, subprocess start-ups), which keeps CI near half an
# hour; the newest-jax log is printed after the main suite's. Fails if either fails.
set -uo pipefail
cd "$(dirname "$0")/.."

export ALLOW_MULTIPLE_LIBTPU_LOAD=1  # both suites compile for TPU through libtpu at once
newest_log="$(mktemp)"
bash scripts/test_newest_jax.sh > "$newest_log" 2>&1 &
newest=$!
python -m pytest -q
main_status=$?
wait "$newest"
newest_status=$?
echo "==================== newest jax: scripts/test_newest_jax.sh ===================="
grep -v "^WARNING: Location" "$newest_log"
echo "[run_tests] this Python: exit $main_status; newest jax: exit $newest_status"
[ "$main_status" -eq 0 ] && [ "$newest_status" -eq 0 ]
