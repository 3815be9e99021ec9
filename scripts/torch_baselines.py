"""Timings of the peers' own torch code on this machine, for the benchmarks' speed ratios only.

Run by a separate virtualenv's python with torch, numpy, transformers, gguf and accelerate
(transformers needs the last two for GGUF files); fpe_jax itself never depends on torch:

  TORCH_PY scripts/torch_baselines.py sparsegpt --official_dir=DIR --inputs=IN.npz \
      --out=OUT.npz [--repeats=5] [--threads=2]
  TORCH_PY scripts/torch_baselines.py llama_nll --gguf=FILE.gguf --windows=W.npz \
      [--repeats=3] [--threads=2]

sparsegpt: imports `SparseGPT` from the official IST-DASLab code checked out at DIR (nothing
of it is copied here) and times `fasterprune` on IN.npz's `w` [d_in, d_out] (fpe_jax layout,
y = x @ w) and `h` [d_in, d_in] (mean of x x^T), with the scalars `sparsity`, `prunen`,
`prunem`, `blocksize`, `percdamp`. Writes the pruned `w` [d_in, d_out] to OUT.npz.

llama_nll: loads the GGUF with Hugging Face transformers (float32) and times the forward plus
the mean next-token NLL of W.npz's int `tokens` [n, seq], all windows in one batch.

Each prints one JSON object on stdout (progress goes to stderr): the seconds of every repeat
after one untimed warm-up, their median, the versions and the thread count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import statistics
import sys
import time

import numpy as np


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _import_torch(threads: int):
  import torch
  torch.set_num_threads(threads)
  return torch


def _timings(run_once, repeats: int) -> tuple[list[float], object]:
  """One untimed warm-up, then `repeats` calls; run_once() returns (seconds, result)."""
  _, result = run_once()
  seconds = []
  for i in range(repeats):
    dt, result = run_once()
    seconds.append(dt)
    _log(f"repeat {i + 1}/{repeats}: {dt:.4f} s")
  return seconds, result


def _report(seconds: list[float], torch, threads: int, **extra) -> None:
  out = {"seconds": seconds, "median_s": statistics.median(seconds),
         "torch_version": torch.__version__, "threads": threads, **extra}
  print(json.dumps(out))


# --------------------------------------------------------------------------------------
# SparseGPT (official code).


def _import_official_sparsegpt(official_dir: str):
  """The official `sparsegpt` module (it does `from quant import *`, so DIR goes on sys.path)."""
  path = pathlib.Path(official_dir).resolve()
  if not (path / "sparsegpt.py").is_file():
    raise FileNotFoundError(f"no sparsegpt.py in {path}")
  sys.path.insert(0, str(path))
  import sparsegpt
  return sparsegpt


@contextlib.contextmanager
def _quiet_cpu_fasterprune(torch):
  """fasterprune ends with an unconditional torch.cuda.synchronize() (an error without CUDA;
  made a no-op here, where there is nothing to wait for) and prints its time and error on
  stdout (sent to stderr, so stdout stays one JSON object)."""
  sync = torch.cuda.synchronize
  if not torch.cuda.is_available():
    torch.cuda.synchronize = lambda *args, **kwargs: None
  try:
    with contextlib.redirect_stdout(sys.stderr):
      yield
  finally:
    torch.cuda.synchronize = sync


def _prune_once(torch, official, w: np.ndarray, h: np.ndarray, cfg: dict):
  """(seconds of fasterprune alone, pruned w [d_in, d_out]) on fresh copies of w and H."""
  d_in, d_out = w.shape
  layer = torch.nn.Linear(d_in, d_out, bias=False)
  layer.weight.data = torch.from_numpy(np.ascontiguousarray(w.T)).clone()  # [out, in]
  pruner = official.SparseGPT(layer)
  # The official add_batch keeps H = 2 / nsamples * sum x x^T, i.e. 2 * mean x x^T when each
  # of the nsamples rows is one token, so H = 2 * h (nsamples only feeds add_batch's running
  # mean; fasterprune never reads it). The scale would not matter anyway: damping is
  # percdamp * mean(diag H), relative, so for H -> cH the factor U of H^-1 becomes U / sqrt(c),
  # the scores w^2 / U_ii^2 all scale by c (same mask) and the updates (w_i / U_ii) U_i: are
  # unchanged; only the printed error scales by c.
  pruner.H = torch.from_numpy(2.0 * h).float()
  pruner.nsamples = cfg["nsamples"]
  with _quiet_cpu_fasterprune(torch):
    start = time.perf_counter()
    pruner.fasterprune(cfg["sparsity"], prunen=cfg["prunen"], prunem=cfg["prunem"],
                       blocksize=cfg["blocksize"], percdamp=cfg["percdamp"])
    seconds = time.perf_counter() - start
  return seconds, layer.weight.data.numpy().T.copy()


def _sparsegpt_inputs(path: str) -> tuple[np.ndarray, np.ndarray, dict]:
  with np.load(path) as f:
    w = np.asarray(f["w"], np.float32)
    h = np.asarray(f["h"], np.float32)
    cfg = {"sparsity": float(f["sparsity"]), "prunen": int(f["prunen"]),
           "prunem": int(f["prunem"]), "blocksize": int(f["blocksize"]),
           "percdamp": float(f["percdamp"]),
           "nsamples": int(f["nsamples"]) if "nsamples" in f else 1}
  if w.ndim != 2 or h.shape != (w.shape[0], w.shape[0]):
    raise ValueError(f"w must be [d_in, d_out] and h [d_in, d_in], got {w.shape}, {h.shape}")
  return w, h, cfg


def cmd_sparsegpt(args) -> None:
  torch = _import_torch(args.threads)
  official = _import_official_sparsegpt(args.official_dir)
  w, h, cfg = _sparsegpt_inputs(args.inputs)
  _log(f"official SparseGPT fasterprune on w {w.shape}, {cfg}")
  seconds, pruned = _timings(lambda: _prune_once(torch, official, w, h, cfg), args.repeats)
  np.savez(args.out, w=pruned)
  _report(seconds, torch, args.threads)


# --------------------------------------------------------------------------------------
# Llama forward (Hugging Face transformers).


def _load_gguf_model(torch, gguf: str):
  from transformers import AutoModelForCausalLM
  path = pathlib.Path(gguf).resolve()
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file {path} does not exist")
  model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                               dtype=torch.float32)
  return model.eval()


def _nll_once(torch, model, tokens):
  """(seconds, mean next-token NLL) of one batched forward under inference_mode."""
  import torch.nn.functional as F
  with torch.inference_mode():
    start = time.perf_counter()
    logits = model(input_ids=tokens, use_cache=False).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                          tokens[:, 1:].reshape(-1))
    value = float(nll)
    seconds = time.perf_counter() - start
  return seconds, value


def cmd_llama_nll(args) -> None:
  os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local file: never ask the Hub
  torch = _import_torch(args.threads)
  import transformers
  with np.load(args.windows) as f:
    tokens = torch.from_numpy(np.asarray(f["tokens"], np.int64))
  if tokens.ndim != 2 or tokens.shape[1] < 2:
    raise ValueError(f"tokens must be [n, seq>=2], got {tuple(tokens.shape)}")
  model = _load_gguf_model(torch, args.gguf)
  _log(f"transformers forward on tokens {tuple(tokens.shape)}, "
       f"attention {model.config._attn_implementation}")
  seconds, nll = _timings(lambda: _nll_once(torch, model, tokens), args.repeats)
  _report(seconds, torch, args.threads, mean_nll=nll,
          transformers_version=transformers.__version__,
          attn_implementation=model.config._attn_implementation)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  sp = sub.add_parser("sparsegpt", help="official SparseGPT fasterprune")
  sp.add_argument("--official_dir", required=True, help="checkout of IST-DASLab/sparsegpt")
  sp.add_argument("--inputs", required=True, help="npz: w, h, sparsity, prunen, prunem, ...")
  sp.add_argument("--out", required=True, help="npz written with the pruned w [d_in, d_out]")
  ll = sub.add_parser("llama_nll", help="transformers Llama forward + mean NLL")
  ll.add_argument("--gguf", required=True, help="the SmolLM2-135M GGUF file")
  ll.add_argument("--windows", required=True, help="npz: int tokens [n, seq]")
  for p, repeats in ((sp, 5), (ll, 3)):
    p.add_argument("--repeats", type=int, default=repeats, help="timed runs after a warm-up")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  args = parser.parse_args(argv)
  if args.repeats < 1 or args.threads < 1:
    parser.error("--repeats and --threads must be >= 1")
  {"sparsegpt": cmd_sparsegpt, "llama_nll": cmd_llama_nll}[args.command](args)


if __name__ == "__main__":
  main()
