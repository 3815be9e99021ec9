"""What the H200 compiler makes of the block-sparse kernels, from their PTX, deviceless.

  python scripts/h200_ptx_report.py [--out=report.json]

Compiles the forward, input-gradient and weight-gradient Triton kernels of
`block_sparse_matmul` (kernels_pallas.bench's 1024x4096x4096 at 25% block density) for a
compile-only NVIDIA H200, in bf16 and f32, with and without `premasked`, and reads each
kernel's PTX from XLA's dump: `ptxas -v` gives its registers and spill bytes, and the
`wgmma.wait_group N` counts say whether the tensor cores overlap the next load (N >= 1)
or wait for every MMA to finish (N = 0 only). Needs the jax-cuda13 plugin that
scripts/install_compilers.sh installs (found by jax's version) and a `ptxas` (CUDA 13's,
or $PTXAS); re-runs itself with the plugin on PYTHONPATH.
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = ("block_sparse_forward_gpu", "block_sparse_input_grad_gpu",
           "block_sparse_weight_grad_gpu")


def _plugin_dir() -> str:
  import importlib.metadata as metadata
  root = os.environ.get("FPE_JAX_COMPILERS", os.path.expanduser("~/.cache/fpe_jax/compilers"))
  return os.path.join(root, f"jax-{metadata.version('jax')}", "cuda")


def _compile_and_dump(dtype_name: str, premasked: bool, dump: str) -> None:
  """In a subprocess with XLA:GPU: compile forward + both gradients, PTX into `dump`."""
  sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
  import jax
  import jax.numpy as jnp
  from jax.experimental import topologies
  from jax.sharding import SingleDeviceSharding
  from kernel_cases import block_mask, grad_of_sum, targeting_gpu

  from kernels_pallas.block_sparse import BlockSparseMask, block_sparse_matmul

  with open(os.path.join(ROOT, "tests", "data", "h200_target_config.txtpb")) as f:
    device = topologies.get_topology_desc(platform="cuda", target_config=f.read(),
                                          topology="1x1x1").devices[0]
  bsm = BlockSparseMask.from_mask(block_mask(4096, 4096, 0.25))
  fn = lambda x, w: block_sparse_matmul(x, w, bsm, implementation="pallas",  # noqa: E731
                                        premasked=premasked)
  dtype = {"bf16": jnp.bfloat16, "f32": jnp.float32}[dtype_name]
  args = [jax.ShapeDtypeStruct(s, dtype, sharding=SingleDeviceSharding(device))
          for s in ((1024, 4096), (4096, 4096))]
  with targeting_gpu(device.platform, device.device_kind, device.core_count):
    lowered = jax.jit(grad_of_sum(fn)).trace(*args).lower(), jax.jit(fn).trace(*args).lower()
  for lo in lowered:
    lo.compile()


def _ptx_facts(ptx_file: str, ptxas: str) -> dict:
  text = open(ptx_file).read()
  info = subprocess.run([ptxas, "-v", "-arch=sm_90a", ptx_file, "-o", os.devnull],
                        capture_output=True, text=True, check=True).stderr
  waits = [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", text)]
  return {
      "registers": int(re.search(r"Used (\d+) registers", info).group(1)),
      "spill_store_bytes": int(re.search(r"(\d+) bytes spill stores", info).group(1)),
      "spill_load_bytes": int(re.search(r"(\d+) bytes spill loads", info).group(1)),
      "wgmma": text.count("wgmma.mma_async"),
      "wait_group": {str(n): waits.count(n) for n in sorted(set(waits))},
      "overlaps": any(n >= 1 for n in waits),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", help="also write the rows as JSON to this file")
  parser.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._child:
    dtype_name, premasked, dump = args._child
    _compile_and_dump(dtype_name, premasked == "1", dump)
    return
  ptxas = os.environ.get("PTXAS") or shutil.which("ptxas") or "/usr/local/cuda-13.0/bin/ptxas"
  if not os.path.exists(ptxas):
    sys.exit("error: no ptxas found: install CUDA 13's or point $PTXAS at one")
  plugin = _plugin_dir()
  if not os.path.isdir(os.path.join(plugin, "jax_plugins")):
    sys.exit(f"error: no jax-cuda13 plugin in {plugin}: run `bash scripts/install_compilers.sh`")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, plugin]))
  rows = []
  for dtype_name in ("bf16", "f32"):
    for premasked in (False, True):
      with tempfile.TemporaryDirectory() as dump:
        env["XLA_FLAGS"] = f"--xla_dump_to={dump}"
        subprocess.run([sys.executable, __file__, "--_child", dtype_name,
                        "1" if premasked else "0", dump], env=env, check=True,
                       stderr=subprocess.DEVNULL)
        for kernel in KERNELS:
          files = [f for f in glob.glob(os.path.join(dump, "*.ptx"))
                   if f".entry {kernel}(" in open(f).read()]
          row = {"kernel": kernel.removeprefix("block_sparse_").removesuffix("_gpu"),
                 "dtype": dtype_name, "premasked": premasked}
          row.update(_ptx_facts(files[0], ptxas) if files else {"error": "no PTX"})
          rows.append(row)
          print(f"{row['kernel']:12s} {dtype_name:5s} premasked={premasked!s:5s} "
                f"regs {row.get('registers')}  spills {row.get('spill_store_bytes')}/"
                f"{row.get('spill_load_bytes')} B  wgmma {row.get('wgmma')}  "
                f"wait_group {row.get('wait_group')}", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
