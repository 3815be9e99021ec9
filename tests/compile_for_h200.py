"""Compiles every case of tests/test_kernels_compile.py for an NVIDIA H200, deviceless.

  PYTHONPATH=<repo>:<compilers>/jax-<version>/cuda JAX_PLATFORMS=cpu \
      python tests/compile_for_h200.py

A separate process because XLA:GPU comes from the jax-cuda13 plugin, which jax discovers
when it starts (scripts/install_compilers.sh keeps it out of the test environment). The
H200 is a compile-only device made from tests/data/h200_target_config.txtpb. Prints one
JSON list: per (case, dtype, masked or premasked weights), the Triton and Mosaic GPU
custom calls in the compiled forward and backward, or the compiler's error.
"""

import itertools
import json
import os
import sys

from jax.experimental import topologies

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_cases import CASES  # noqa: E402
from test_kernels_compile import DTYPES, PREMASKED, compiled_kernel_calls  # noqa: E402

TARGET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                      "h200_target_config.txtpb")


def main() -> None:
  with open(TARGET) as f:
    topology = topologies.get_topology_desc(platform="cuda", target_config=f.read(),
                                            topology="1x1x1")
  device = topology.devices[0]
  out = []
  for case, (name, dtype), (weights, premasked) in itertools.product(
      sorted(CASES), DTYPES.items(), PREMASKED.items()):
    record = {"case": case, "dtype": name, "weights": weights, "device": device.device_kind}
    try:
      record.update(compiled_kernel_calls(CASES[case], dtype, device, premasked))
    except Exception as e:  # noqa: BLE001 -- the compiler's verdict is the result
      record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    out.append(record)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
