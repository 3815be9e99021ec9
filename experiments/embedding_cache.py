"""Sentence embeddings computed once with MiniLM and cached on disk (I/O side of the library).

The cache key is sha256(model files) + sha256(texts, in order), so a changed model or a
changed data set never reads stale embeddings. Files go to
`$FPE_JAX_DATA/embeddings/` (default `~/.cache/fpe_jax/embeddings/`): `<key>.npy` with the
[n, d] float32 embeddings and `<key>.json` with what they were computed from and the
sha256 of the array's bytes. Writes are atomic (temporary file, then rename), so an
interrupted run leaves no half cache; a cache entry is used only if it loads, matches its
record (model, texts, shape, dtype, checksum) and is finite, else it is recomputed and the
reason logged (`check_cache_entry`).
"""
import hashlib
import json
import os
import pathlib
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from fpe_jax.data import minilm as minilm_data
from fpe_jax.models import bert

# Sequence lengths are rounded up to a multiple of this: a few jit shapes, little padding.
_LENGTH_BUCKET = 16


def default_cache_dir() -> pathlib.Path:
  root = os.environ.get("FPE_JAX_DATA", str(pathlib.Path.home() / ".cache" / "fpe_jax"))
  return pathlib.Path(root) / "embeddings"


def texts_hash(texts: Sequence[str]) -> str:
  """sha256 of the texts in order (length-prefixed, so boundaries are unambiguous)."""
  digest = hashlib.sha256()
  for text in texts:
    data = text.encode("utf-8")
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)
  return digest.hexdigest()


def array_hash(array: np.ndarray) -> str:
  """sha256 of an array's bytes (C order)."""
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def check_cache_entry(path: pathlib.Path, *, model_hash: str, data_hash: str,
                      shape: tuple[int, int]) -> tuple[np.ndarray | None, str]:
  """Loads the cache entry `path` (.npy beside its .json record) if it is intact.

  Returns:
    (embeddings, "") when the entry loads and matches its record and the expected model,
    texts, `shape`, float32 and checksum, and is finite; else (None, why not).
  """
  try:
    meta = json.loads(path.with_suffix(".json").read_text())
    emb = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:  # missing record, truncated or garbage file
    return None, f"unreadable ({type(e).__name__}: {e})"
  expected = {"model_hash": model_hash, "data_hash": data_hash, "sha256": array_hash(emb)}
  wrong = [k for k, v in expected.items() if meta.get(k) != v]
  if emb.shape != shape or emb.dtype != np.float32:
    return None, f"holds {emb.dtype}{list(emb.shape)}, expected float32{list(shape)}"
  if wrong:
    return None, f"does not match its record ({', '.join(wrong)})"
  if not np.all(np.isfinite(emb)):
    return None, "holds non-finite values"
  return emb, ""


def _format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def embed_texts(model: minilm_data.MiniLM, texts: Sequence[str], *, batch_size: int = 64,
                log: Callable[[str], None] = print,
                log_every_s: float = 10.0) -> np.ndarray:
  """Embeds texts in length-sorted batches, logging progress with rate and time left.

  Args:
    model: the loaded MiniLM.
    texts: n strings.
    batch_size: sentences per forward call (every call has this many rows; the last
      batch is filled with all-padding rows, so each sequence length compiles once).
    log: where progress lines go.
    log_every_s: seconds between progress lines.

  Returns:
    [n, d] float32 unit-norm embeddings in the order of `texts`.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
  n = len(texts)
  dim = model.params["embeddings"]["word"].shape[1]
  out = np.zeros((n, dim), np.float32)
  if n == 0:
    return out
  lengths = np.asarray([len(e.ids) for e in model.tokenizer.encode_batch(list(texts))])
  # Sorting by length keeps padding (and wasted compute) small inside each batch.
  order = np.argsort(lengths, kind="stable")
  params = jax.device_put(model.params)
  forward = jax.jit(bert.sentence_embedding, static_argnums=3)
  total_tokens, tokens_done = int(lengths.sum()), 0
  start = last_log = time.perf_counter()
  for begin in range(0, n, batch_size):
    idx = order[begin:begin + batch_size]
    ids, mask = minilm_data.tokenize(model.tokenizer, [texts[i] for i in idx],
                                     pad_to_multiple_of=_LENGTH_BUCKET)
    fill = batch_size - len(idx)
    if fill:
      ids = np.pad(ids, ((0, fill), (0, 0)))
      mask = np.pad(mask, ((0, fill), (0, 0)))
    emb = np.asarray(forward(params, ids, mask, model.config))
    out[idx] = emb[:len(idx)]
    done = begin + len(idx)
    tokens_done += int(lengths[idx].sum())
    now = time.perf_counter()
    if now - last_log >= log_every_s or done == n:
      elapsed = max(now - start, 1e-9)
      # Batches grow longer as the sort goes on: time left is estimated from tokens.
      left = (total_tokens - tokens_done) / max(tokens_done / elapsed, 1e-9)
      log(f"[embed] {done}/{n} texts, {done / elapsed:.1f} texts/s, "
          f"elapsed {_format_seconds(elapsed)}, left {_format_seconds(left)}")
      last_log = now
  return out


def cached_embeddings(texts: Sequence[str], *, model: minilm_data.MiniLM | None = None,
                      cache_dir: pathlib.Path | str | None = None, batch_size: int = 64,
                      log: Callable[[str], None] = print) -> np.ndarray:
  """Embeddings of `texts`, from the disk cache if present, else computed and stored.

  Args:
    texts: n strings (order matters: row i embeds texts[i]).
    model: the loaded MiniLM (loaded here if None).
    cache_dir: cache folder (default `default_cache_dir()`).
    batch_size: sentences per forward call when computing.
    log: where progress lines go.

  Returns:
    [n, d] float32 unit-norm embeddings.
  """
  model = minilm_data.load_minilm() if model is None else model
  cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  data_hash = texts_hash(texts)
  key = hashlib.sha256((model.model_hash + data_hash).encode()).hexdigest()[:32]
  path = cache_dir / f"minilm-{key}.npy"
  if path.exists():
    dim = model.params["embeddings"]["word"].shape[1]
    emb, damage = check_cache_entry(path, model_hash=model.model_hash, data_hash=data_hash,
                                    shape=(len(texts), dim))
    if emb is not None:
      log(f"[embed] cache hit {path} ({emb.shape[0]} x {emb.shape[1]})")
      return emb
    log(f"[embed] cache {path} is {damage}: recomputing")
  log(f"[embed] computing {len(texts)} MiniLM embeddings -> {path}")
  emb = embed_texts(model, texts, batch_size=batch_size, log=log)
  cache_dir.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
  np.save(tmp, emb)
  os.replace(tmp, path)
  meta = {"model_dir": str(model.model_dir), "model_hash": model.model_hash,
          "data_hash": data_hash, "num_texts": len(texts), "dim": int(emb.shape[1]),
          "max_length": model.max_length, "sha256": array_hash(emb)}
  tmp_meta = path.with_suffix(f".tmp{os.getpid()}.json")
  tmp_meta.write_text(json.dumps(meta, indent=2))
  os.replace(tmp_meta, path.with_suffix(".json"))
  return emb
