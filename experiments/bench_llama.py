"""Benchmark: the SmolLM2 forward + held-out NLL, fpe_jax against Hugging Face transformers.

  python -m experiments.bench_llama [--windows=8 --window=512 --repeats=3]
  python -m experiments.bench_llama --torch_python=/path/to/torch-venv/bin/python

Times, on --windows consecutive windows of Persuasion (the held-out novel) in one batch,
the mean next-token NLL of SmolLM2-135M from its GGUF (float32) by
  - fpe_jax: `llama.perplexity`'s jitted program (blocks in a scan, then the output
    projection + NLL over chunks of positions, `llama.hidden_nll`);
  - fpe_jax with the logits materialised at once (`token_nll(forward(...))`), the
    formulation before the chunked head, as the in-process reference;
  - with --torch_python, transformers' LlamaForCausalLM on the same GGUF and tokens
    (scripts/torch_baselines.py in that virtualenv, --torch_threads threads; see
    experiments.peer_baselines), on the same machine right after.
Each time is the median of --repeats calls after one untimed (compiling) call; ratios are
against fpe_jax's; the NLLs of both libraries are printed (they agree to ~1e-5).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import common, llm_setup, peer_baselines
from fpe_jax.data import austen, gguf_loader
from fpe_jax.models import llama

FLAGS = flags.FLAGS
flags.DEFINE_integer("windows", 8, "Held-out windows, one batch.")
flags.DEFINE_integer("window", 512, "Tokens per window.")
flags.DEFINE_integer("repeats", 3, "Timed calls; the median is reported.")
flags.DEFINE_string("torch_python", "", "Python of a torch virtualenv: also time transformers.")
flags.DEFINE_integer("torch_threads", 0, "torch threads (0: this machine's cores).")
for _name in ("windows", "repeats"):
  common.flag_validator(_name, lambda v: v >= 1, "must be >= 1")
common.flag_validator("window", lambda v: v >= 2, "must be >= 2")
common.flag_validator("torch_threads", lambda v: v >= 0, "must be >= 0 (0: every core)")
common.flag_validator("torch_python", peer_baselines.is_python,
                      "must be the python executable of a torch virtualenv (or empty)")


@dataclasses.dataclass(frozen=True)
class Config:
  """The benchmark's flags, read once (`config_from_flags`)."""
  windows: int
  window: int
  repeats: int
  torch_python: str
  torch_threads: int


def config_from_flags() -> Config:
  return Config(windows=FLAGS.windows, window=FLAGS.window, repeats=FLAGS.repeats,
                torch_python=FLAGS.torch_python,
                torch_threads=FLAGS.torch_threads or os.cpu_count() or 1)


def main(argv):
  if len(argv) > 1:
    raise common.UsageError(f"unexpected arguments {argv[1:]}; use --flags")
  config = config_from_flags()
  with common.packaged_data():
    ckpt = gguf_loader.load_llama_gguf()
  llm_setup.check_context(ckpt, window=config.window)
  cfg, params = ckpt.config, jax.device_put(ckpt.params)
  with common.packaged_data(), common.blame("windows / --window", ValueError):
    _, windows = austen.calibration_and_eval_windows(
        lambda s: ckpt.tokenizer.encode(s).ids, calib_windows=1, calib_window=2,
        eval_window=config.window, eval_windows=config.windows, seed=0)
  common.validate("windows", len(windows) == config.windows,
                  f"Persuasion holds {len(windows)} windows of {config.window} tokens, not "
                  f"{config.windows}")
  tokens = jnp.asarray(windows)
  count = windows.shape[0] * (windows.shape[1] - 1)
  materialised = jax.jit(lambda p, t: jnp.sum(llama.token_nll(llama.forward(cfg, p, t), t)))
  sides = {
      "fpe_jax": lambda: llama.perplexity(cfg, params, tokens, batch_size=len(windows)),
      "fpe_jax, logits at once": lambda: float(jnp.exp(materialised(params, tokens) / count)),
  }
  print(f"backend={jax.default_backend()} windows={windows.shape} repeats={config.repeats}")
  results = {}
  for name, fn in sides.items():
    _, times, ppl = common.time_calls(fn, config.repeats)
    results[name] = (statistics.median(times), float(np.log(ppl)))
  if config.torch_python:
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "windows.npz")
      np.savez(path, tokens=windows.astype(np.int32))
      peer = peer_baselines.run(config.torch_python, "llama_nll",
                                gguf=gguf_loader.smollm2_gguf_path(), windows=path,
                                repeats=config.repeats, threads=config.torch_threads)
    results[f"transformers {peer['transformers_version']} (torch {peer['torch_version']}, "
            f"{peer['threads']} threads)"] = (peer["median_s"], peer["mean_nll"])
  base = results["fpe_jax"][0]
  print(f"{'implementation':<58} {'seconds':>8} {'tokens/s':>9} {'x fpe_jax':>9} {'mean NLL':>9}")
  for name, (seconds, nll) in results.items():
    print(f"{name:<58} {seconds:8.2f} {windows.size / seconds:9.0f} {seconds / base:9.2f} "
          f"{nll:9.5f}")


if __name__ == "__main__":
  common.run(main)
