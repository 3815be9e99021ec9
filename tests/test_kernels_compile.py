"""The kernels compiled by the real compilers for TPU v5e / v6e and an H200, deviceless.

XLA compiles for a TPU ahead of time on this CPU-only host: `jax.experimental.topologies`
gives compile-only TPU devices, and `jax.jit(f).trace(args on such a device).lower()
.compile()` runs libtpu's compiler, Mosaic included, with its VMEM/SMEM and layout
checks that interpret mode never sees (../shared/docs/hardware.md). The compiler is the
libtpu of the installed jax, put in its own folder by `bash scripts/install_compilers.sh`
(part of the README's test command); without it these tests fail, they do not skip.
For an H200 the compiler is XLA:GPU with Triton from the jax-cuda13 plugin (the same
script), in a subprocess (tests/compile_for_h200.py) on a compile-only device described by
tests/data/h200_target_config.txtpb.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding
from kernel_cases import CASES, grad_of_sum, kernel_calls, runs_mosaic_gpu, targeting_gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILERS = os.path.join(os.environ.get("FPE_JAX_COMPILERS",
                                        os.path.expanduser("~/.cache/fpe_jax/compilers")),
                         f"jax-{jax.__version__}")
LIBTPU = os.path.join(COMPILERS, "libtpu", "libtpu", "libtpu.so")
TPU_ENVIRONMENT = {
    "TPU_LIBRARY_PATH": LIBTPU,  # read when the TPU plugin loads (the first topology)
    # libtpu looks for TPU hosts when it loads; compile-only devices need none.
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_ACCELERATOR_TYPE": "v5litepod-1",
}

TOPOLOGIES = {"v5e": "v5e:1x1", "v6e": "v6e:1x1"}


@pytest.fixture(scope="module", params=sorted(TOPOLOGIES))
def tpu(request):
  """A compile-only TPU device of the named generation."""
  for name, value in TPU_ENVIRONMENT.items():
    os.environ.setdefault(name, value)
  assert os.path.isfile(os.environ["TPU_LIBRARY_PATH"]), (
      f"no libtpu at {os.environ['TPU_LIBRARY_PATH']}: run `bash scripts/install_compilers.sh`")
  topology = topologies.get_topology_desc(TOPOLOGIES[request.param], platform="tpu",
                                          chips_per_host_bounds=(1, 1, 1))
  return topology.devices[0]


DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def compiled_kernel_calls(case, dtype, device, premasked: bool = False) -> dict:
  """Compiles a case's "pallas" forward and gradients for `device`: the kernels' custom
  calls in each compiled program ({"forward": kernel_calls, "backward": kernel_calls})."""
  op, shapes = case()
  fn = op("pallas", premasked)
  args = [jax.ShapeDtypeStruct(s, dtype, sharding=SingleDeviceSharding(device))
          for s in shapes]
  calls = {}
  for part, f in (("forward", fn), ("backward", grad_of_sum(fn))):
    with targeting_gpu(device.platform, device.device_kind,
                       getattr(device, "core_count", None)):
      lowered = jax.jit(f).trace(*args).lower()
    calls[part] = kernel_calls(lowered.compile().as_text())
  return calls


PREMASKED = {"masked": False, "premasked": True}


@pytest.mark.parametrize("weights", sorted(PREMASKED))
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_compile_to_mosaic_kernels(tpu, case, dtype, weights):
  calls = compiled_kernel_calls(CASES[case], DTYPES[dtype], tpu, PREMASKED[weights])
  assert calls["forward"] == {"tpu": 1, "triton": 0, "mosaic_gpu": 0}
  backward = calls["backward"]
  assert 2 <= backward["tpu"] <= 3  # the input and weight gradients (+ the forward)
  assert backward["triton"] == backward["mosaic_gpu"] == 0


@pytest.fixture(scope="module")
def h200():
  """{(case, dtype, weights): compile record} of tests/compile_for_h200.py, run once."""
  plugin = os.path.join(COMPILERS, "cuda")
  assert os.path.isdir(os.path.join(plugin, "jax_plugins")), (
      f"no jax-cuda13 plugin in {plugin}: run `bash scripts/install_compilers.sh`")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, plugin]))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "compile_for_h200.py")],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return {(r["case"], r["dtype"], r["weights"]): r
          for r in json.loads(proc.stdout.splitlines()[-1])}


@pytest.mark.parametrize("weights", sorted(PREMASKED))
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_compile_to_gpu_kernels_for_an_h200(h200, case, dtype, weights):
  """Triton kernels; on jax >= 0.11 with premasked 16-bit weights, Mosaic GPU kernels for
  the forward and input gradient (TMA + wgmma) beside Triton's weight gradient."""
  record = h200[(case, dtype, weights)]
  assert record["device"] == "NVIDIA H200"
  assert "error" not in record, record["error"]
  forward, backward = record["forward"], record["backward"]
  assert forward["tpu"] == backward["tpu"] == 0
  if runs_mosaic_gpu(DTYPES[dtype], PREMASKED[weights]):
    assert forward == {"tpu": 0, "triton": 0, "mosaic_gpu": 1}
    assert backward["triton"] == 1 and 1 <= backward["mosaic_gpu"] <= 2
  else:
    assert forward == {"tpu": 0, "triton": 1, "mosaic_gpu": 0}
    assert backward["mosaic_gpu"] == 0 and 2 <= backward["triton"] <= 3
