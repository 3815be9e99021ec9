"""examples/quickstart.ipynb runs top to bottom (nbclient), and says what it should."""

import os
import pathlib
import re

import nbclient
import nbformat
from ipykernel import kernelspec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
KERNEL = "fpe_jax_test"
FAKE_DEVICES = re.compile(r"--xla_force_host_platform_device_count=\d+")


def _kernel_manager(kernel_dir: pathlib.Path) -> KernelManager:
  """A kernel of this interpreter (sys.executable), whatever `python` means on PATH.

  The spec is written here rather than found: a fresh `pip install ipykernel` registers a
  "python3" kernel that runs `python` from PATH, which need not be the interpreter that
  has fpe_jax. The notebook runs as a researcher's would, on one CPU device: conftest's
  fake devices are taken out of the kernel's XLA_FLAGS.
  """
  xla_flags = FAKE_DEVICES.sub("", os.environ.get("XLA_FLAGS", "")).strip()
  kernelspec.write_kernel_spec(kernel_dir / KERNEL, overrides={
      "env": {"XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}})
  return KernelManager(kernel_name=KERNEL,
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))


def _stdout(notebook) -> str:
  return "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                 for output in cell.outputs if output.output_type == "stream")


def test_quickstart_runs_and_reports_its_figures(tmp_path):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  assert all(not cell.get("outputs") for cell in notebook.cells), "commit it without outputs"
  client = nbclient.NotebookClient(notebook, km=_kernel_manager(tmp_path / "kernels"),
                                   timeout=600, resources={"metadata": {"path": str(ROOT)}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, on failure
  text = _stdout(notebook)

  before, after = map(int, re.search(r"non-zeros before expand: (\d+), after: (\d+)",
                                     text).groups())
  assert before == after == 32 * 8 + 8 + 8 * 1 + 1
  trained_on = [int(n) for n in re.findall(r"test accuracy [\d.]+, non-zeros (\d+)", text)]
  assert trained_on == [before, before]  # dense and FPE, after training on
  assert re.search(r"hidden neurons: 8 -> 16", text)

  assert float(re.search(r"kept fraction ([\d.]+)", text).group(1)) == 0.5
  sparsegpt, magnitude = map(float, re.search(
      r"output error: sparsegpt ([\d.]+), magnitude ([\d.]+)", text).groups())
  assert sparsegpt < magnitude

  clean = float(re.search(r"ensemble clean accuracy ([\d.]+)", text).group(1))
  attacked = [float(a) for a in re.findall(r"PGD accuracy ([\d.]+)", text)]
  assert clean > 0.8 and len(attacked) == 2 and clean >= attacked[0] >= attacked[1]
