"""Test-session setup: 8 fake CPU devices for the sharding tests, x64 off, CPU only.

XLA reads XLA_FLAGS once, when the backend starts, so this must run before any test
imports jax (conftest is imported first by pytest).
"""
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402 -- after XLA_FLAGS, as above

# The suites that run the binaries end to end, in subprocesses (plus the notebook): the
# bulk of the suite's time. `-m "not end_to_end"` leaves the library, kernel and compile
# tests, which is what CI runs again on the newest jax (README).
END_TO_END = {"test_bad_inputs.py", "test_boolean_binary.py", "test_deep_binary.py",
              "test_embeddings_binary.py", "test_llm_binaries.py", "test_ncen_binary.py",
              "test_notebook.py"}


def pytest_collection_modifyitems(items):
  for item in items:
    if item.path.name in END_TO_END:
      item.add_marker(pytest.mark.end_to_end)


def pytest_configure(config):
  """The folder of the binaries' compilation caches for this session (tests/binaries.py)."""
  os.environ["FPE_JAX_TEST_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="fpe_jax_compile_cache_")


def pytest_unconfigure(config):
  shutil.rmtree(os.environ.pop("FPE_JAX_TEST_COMPILE_CACHE", ""), ignore_errors=True)
