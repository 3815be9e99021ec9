"""Jane Austen's six novels (Debian `r-cran-janeaustenr`) as text, token windows and splits.

The Debian package ships R's lazy-load database `janeaustenr/data/Rdata.{rdx,rdb}`: `.rdx` is
a gzip'd R serialisation of an index {variable name: (offset, length)} into `.rdb`, where
each object is 4 bytes (big-endian uncompressed length) then a zlib stream of a serialised
character vector, one element per line of the Project Gutenberg text. `rdata` parses both,
so R is not needed.

Text: the lines of each paragraph are joined with spaces (Gutenberg hard-wraps at ~70
columns) and paragraphs are separated by a blank line ("\\n\\n").

Splits (the default, `CALIBRATION_NOVELS` / `EVAL_NOVEL`): calibration windows are drawn at
random positions (explicit seed) from the five other novels, each tokenised separately and
windows never crossing a novel boundary; evaluation windows are the consecutive
non-overlapping windows of Persuasion from its start, so the held-out text is a different
novel and the two splits share no text.
"""

from __future__ import annotations

import functools
import gzip
import os
import pathlib
import warnings
import zlib
from collections.abc import Callable, Sequence

import numpy as np

INSTALL_HINT = "run `bash scripts/install_data.sh`"
NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey",
          "persuasion")
EVAL_NOVEL = "persuasion"
CALIBRATION_NOVELS = tuple(n for n in NOVELS if n != EVAL_NOVEL)
_REL_DIR = "janeaustenr/usr/lib/R/site-library/janeaustenr/data"


def austen_data_dir() -> pathlib.Path:
  """Directory of Rdata.rdx/.rdb: $FPE_JAX_DATA (default ~/.cache/fpe_jax)/janeaustenr/..."""
  root = os.environ.get("FPE_JAX_DATA") or os.path.join(os.path.expanduser("~"), ".cache",
                                                        "fpe_jax")
  return pathlib.Path(root) / _REL_DIR


def _parse_r(raw: bytes):
  import rdata  # noqa: PLC0415 (optional `data` extra)
  with warnings.catch_warnings():
    # Lazy-load objects carry no RDS/RDA file header; rdata warns and parses them as RDS.
    warnings.simplefilter("ignore", UserWarning)
    return rdata.conversion.convert(rdata.parser.parse_data(raw))


def _paragraphs_to_text(lines: Sequence[str]) -> str:
  paragraphs, current = [], []
  for line in lines:
    line = str(line).strip()
    if line:
      current.append(line)
    elif current:
      paragraphs.append(" ".join(current))
      current = []
  if current:
    paragraphs.append(" ".join(current))
  return "\n\n".join(paragraphs)


@functools.cache
def _load_novels_cached(data_dir: str) -> tuple[tuple[str, str], ...]:
  directory = pathlib.Path(data_dir)
  rdx, rdb = directory / "Rdata.rdx", directory / "Rdata.rdb"
  if not (rdx.is_file() and rdb.is_file()):
    raise FileNotFoundError(f"Austen text (janeaustenr Rdata.rdx/.rdb) not found in "
                            f"{directory}: {INSTALL_HINT}")
  try:
    import rdata  # noqa: F401, PLC0415
  except ImportError as e:
    raise ImportError(f"Python package `rdata` is missing: {INSTALL_HINT}") from e
  index = _parse_r(gzip.decompress(rdx.read_bytes()))["variables"]
  blob = rdb.read_bytes()
  novels = []
  for name in NOVELS:
    if name not in index:
      raise ValueError(f"novel {name!r} missing from {rdx}")
    offset, length = (int(v) for v in index[name])
    lines = _parse_r(zlib.decompress(blob[offset + 4:offset + length]))
    novels.append((name, _paragraphs_to_text(lines)))
  return tuple(novels)


def load_novels(data_dir: str | pathlib.Path | None = None) -> dict[str, str]:
  """The six novels as {name: text} (names in `NOVELS`). Parsed once per process."""
  return dict(_load_novels_cached(str(data_dir or austen_data_dir())))


def _check_novels(names: Sequence[str], arg: str) -> None:
  bad = [n for n in names if n not in NOVELS]
  if bad or not names:
    raise ValueError(f"{arg}={list(names)} must be a non-empty subset of {list(NOVELS)}")


def tokenize_novels(encode: Callable[[str], Sequence[int]], names: Sequence[str],
                    data_dir: str | pathlib.Path | None = None) -> dict[str, np.ndarray]:
  """{name: [n_tokens] int32} for the named novels, each tokenised on its own."""
  _check_novels(names, "novels")
  texts = load_novels(data_dir)
  return {n: np.asarray(encode(texts[n]), np.int32) for n in names}


def random_windows(token_streams: Sequence[np.ndarray], *, num_windows: int, window: int,
                   seed: int) -> np.ndarray:
  """Windows at uniformly random start positions (no window crosses two streams).

  Args:
    token_streams: 1-D int token arrays (one per novel).
    num_windows: windows to draw.
    window: tokens per window.
    seed: seeds a numpy Generator (the same seed gives the same windows).

  Returns:
    [num_windows, window] int32.
  """
  if num_windows < 1 or window < 2:
    raise ValueError(f"num_windows={num_windows} must be >= 1 and window={window} >= 2")
  # A start is uniform over all valid positions of all streams together.
  valid = np.array([max(len(s) - window + 1, 0) for s in token_streams])
  if valid.sum() == 0:
    raise ValueError(f"window={window} is longer than every token stream")
  rng = np.random.default_rng(seed)
  flat = rng.integers(0, valid.sum(), size=num_windows)
  stream = np.searchsorted(np.cumsum(valid), flat, side="right")
  start = flat - np.concatenate([[0], np.cumsum(valid)[:-1]])[stream]
  return np.stack([token_streams[s][o:o + window] for s, o in zip(stream, start, strict=True)]
                  ).astype(np.int32)


def consecutive_windows(tokens: np.ndarray, *, window: int,
                        max_windows: int | None = None) -> np.ndarray:
  """Non-overlapping windows from the start of `tokens` (the tail shorter than a window is
  dropped). Returns [n_windows, window] int32, n_windows capped by max_windows."""
  if window < 2:
    raise ValueError(f"window={window} must be >= 2")
  n = len(tokens) // window
  if max_windows is not None:
    if max_windows < 1:
      raise ValueError(f"max_windows={max_windows} must be >= 1")
    n = min(n, max_windows)
  if n == 0:
    raise ValueError(f"window={window} is longer than the text ({len(tokens)} tokens)")
  return np.asarray(tokens[:n * window], np.int32).reshape(n, window)


def calibration_and_eval_windows(
    encode: Callable[[str], Sequence[int]], *, calib_windows: int, calib_window: int,
    eval_window: int, eval_windows: int | None = None, seed: int = 0,
    calibration_novels: Sequence[str] = CALIBRATION_NOVELS, eval_novel: str = EVAL_NOVEL,
    data_dir: str | pathlib.Path | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The documented split: random calibration windows and consecutive held-out windows.

  Args:
    encode: text -> token ids (e.g. `lambda s: tokenizer.encode(s).ids`).
    calib_windows, calib_window: number and length of calibration windows.
    eval_window: length of evaluation windows; eval_windows caps their number (None: all).
    seed: calibration window seed.
    calibration_novels: novels the calibration windows come from.
    eval_novel: held-out novel; must not be a calibration novel.
    data_dir: override of `austen_data_dir()`.

  Returns:
    (calibration [calib_windows, calib_window], evaluation [n_eval, eval_window]) int32.
  """
  _check_novels(calibration_novels, "calibration_novels")
  _check_novels([eval_novel], "eval_novel")
  if eval_novel in calibration_novels:
    raise ValueError(f"eval_novel={eval_novel!r} must not be one of calibration_novels="
                     f"{list(calibration_novels)}")
  streams = tokenize_novels(encode, [*calibration_novels, eval_novel], data_dir)
  calib = random_windows([streams[n] for n in calibration_novels], num_windows=calib_windows,
                         window=calib_window, seed=seed)
  held_out = consecutive_windows(streams[eval_novel], window=eval_window,
                                 max_windows=eval_windows)
  return calib, held_out
