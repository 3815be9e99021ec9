"""What the binaries' end-to-end tests share: the subprocess environment and the refusal check."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(devices: int = 1) -> dict:
  """A binary's environment: CPU, the repository importable, `devices` CPU devices.

  tests/conftest.py fakes 8 devices for this process; a binary gets one unless asked
  (like a user's laptop run). No persistent compile cache: each run compiles afresh.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def assert_refused(result, flag: str, workdir) -> None:
  """Bad input: a non-zero exit, one `error: ...` line on stderr naming `flag`, nothing
  written under `workdir`."""
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("error: ") and flag in lines[0], lines[0]
  assert not os.path.exists(workdir)
