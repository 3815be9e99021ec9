r"""FPE on MLP heads over frozen MiniLM sentence embeddings (Rotten Tomatoes).

  python -m experiments.embeddings --flagfile=experiments/flags/embeddings_quick.flags

The paper's heads over frozen CLIP image embeddings, with what is offline here in their
place: MiniLM-L6 sentence embeddings (384-d, text, not images) of the Rotten Tomatoes
review snippets, computed once and cached on disk (experiments/embedding_cache.py).
Tasks (fpe_jax/data/rotten_tomatoes.py): "sentiment" (fresh vs rotten, 2 classes) and
"movie" (which of 338 movies a snippet reviews: the high-load case). The head is an MLP
[384, width, classes] whose hidden layer FPE expands; every arm (dense, FPE random /
feature / overlap, DropConnect, larger dense models) is described in
experiments/fpe_sweep.py. results.json holds accuracy, capacity and |cos| per run and
their mean ± std over seeds, the gain over dense and the equivalent dense size.
"""

import dataclasses
import functools
import pathlib

import numpy as np
from absl import flags

from experiments import common, embedding_cache, fpe_sweep
from fpe_jax.data import minilm, rotten_tomatoes

FLAGS = flags.FLAGS

flags.DEFINE_list("tasks", list(rotten_tomatoes.TASKS),
                  f"Tasks among {', '.join(rotten_tomatoes.TASKS)}.")
flags.DEFINE_integer("depth", 1, "Hidden layers of the head (all expanded, one budget).")
flags.DEFINE_float("test_fraction", 0.2, "Share of each class held out for test.")
flags.DEFINE_integer("data_seed", 0, "Seed of the stratified train/test split.")
common.seed_validator("data_seed")
flags.DEFINE_integer("max_rows", 0, "Use only the first N review rows of the corpus "
                     "(0: all 12,808); for smoke tests.")
flags.DEFINE_string("cache_dir", "", "Embedding cache folder (default "
                    "$FPE_JAX_DATA/embeddings, else ~/.cache/fpe_jax/embeddings).")
flags.DEFINE_integer("embed_batch", 64, "Sentences per MiniLM forward call.")
flags.DEFINE_bool("standardize", True, "z-score each embedding dimension with the training "
                  "set's mean and std (unit-norm 384-d embeddings have components ~0.05, "
                  "which makes a freshly initialised head learn slowly).")
# per_layer, not global: with 338 classes the copied outgoing matrix [alpha * width, 338]
# holds most of the expanded weights and its He-initialised entries are ~5x larger than
# the incoming ones (fan-in width vs 384), so one global magnitude threshold prunes the
# incoming layer away entirely at alpha 4 (every child unconnected, chance accuracy).
fpe_sweep.define_sweep_flags(budget="per_layer")

common.flag_validator("tasks", lambda v: bool(v) and set(v) <= set(rotten_tomatoes.TASKS),
                      f"a comma list of tasks among {', '.join(rotten_tomatoes.TASKS)}")
common.flag_validator("depth", lambda v: v >= 1, "must be >= 1")
common.flag_validator("test_fraction", lambda v: 0 < v < 1, "must be in (0, 1)")
common.flag_validator("max_rows", lambda v: v >= 0, "must be >= 0 (0: all rows)")
common.flag_validator("embed_batch", lambda v: v >= 1, "must be >= 1")


@dataclasses.dataclass(frozen=True)
class Config:
  """The embeddings binary's flags, read once (`config_from_flags`).

  Attributes:
    tasks: among rotten_tomatoes.TASKS.
    depth: hidden layers of the head.
    test_fraction: share of each class held out for test.
    data_seed: seed of the stratified split.
    max_rows: review rows used (0: all).
    cache_dir: the embedding cache ("": the default).
    embed_batch: sentences per MiniLM call.
    standardize: z-score the embeddings with the training set's statistics.
    sweep: the sweep.
  """
  tasks: tuple[str, ...]
  depth: int
  test_fraction: float
  data_seed: int
  max_rows: int
  cache_dir: str
  embed_batch: int
  standardize: bool
  sweep: fpe_sweep.SweepConfig


def config_from_flags() -> Config:
  """The config of the parsed flags; raises `common.UsageError` on a bad combination."""
  f = FLAGS
  return Config(tasks=tuple(t for t in rotten_tomatoes.TASKS if t in f.tasks), depth=f.depth,
                test_fraction=f.test_fraction, data_seed=f.data_seed, max_rows=f.max_rows,
                cache_dir=f.cache_dir, embed_batch=f.embed_batch, standardize=f.standardize,
                sweep=fpe_sweep.real_data_sweep_config(f))


def head_spec(d_in: int, num_classes: int, depth: int) -> fpe_sweep.ModelSpec:
  return fpe_sweep.ModelSpec(head_sizes=lambda h: [d_in] + [h] * depth + [num_classes],
                            expand_layers=tuple(range(depth)))


def load_tasks(cfg: Config) -> dict:
  """Reviews, embeddings (cached) and the task splits; raises UsageError on missing data."""
  with common.packaged_data():
    reviews = rotten_tomatoes.load_reviews()
    model = minilm.load_minilm()
  if cfg.max_rows:
    reviews = rotten_tomatoes.Reviews(texts=reviews.texts[:cfg.max_rows],
                                      fresh=reviews.fresh[:cfg.max_rows],
                                      movies=reviews.movies[:cfg.max_rows])
  tasks = {}
  for name in cfg.tasks:
    task = rotten_tomatoes.make_task(reviews, name, test_fraction=cfg.test_fraction,
                                     seed=cfg.data_seed)
    common.validate("max_rows", task.num_classes >= 2,
                    f"{cfg.max_rows} rows leave task {name!r} fewer than 2 classes")
    for part, rows in (("training", task.train), ("test", task.test)):
      missing = task.num_classes - len(np.unique(task.labels[rows]))
      common.validate("max_rows" if cfg.max_rows else "test_fraction", not missing,
                      f"task {name!r} has no {part} example of {missing} of its "
                      f"{task.num_classes} classes (--max_rows={cfg.max_rows}, "
                      f"--test_fraction={cfg.test_fraction})")
    tasks[name] = task
  cache_dir = (pathlib.Path(cfg.cache_dir) if cfg.cache_dir
               else embedding_cache.default_cache_dir())
  try:
    cache_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise common.UsageError(f"--cache_dir: cannot use {cache_dir} as a folder: "
                            f"{e.strerror}") from None
  # All tasks are rows of the same snippets: one embedding pass (and cache entry) for all.
  emb = embedding_cache.cached_embeddings(reviews.texts, model=model,
                                          cache_dir=cache_dir,
                                          batch_size=cfg.embed_batch,
                                          log=lambda line: print(line, flush=True))
  out = {}
  for name, task in tasks.items():
    x = emb[task.rows]
    if cfg.standardize:
      mean, std = x[task.train].mean(0), x[task.train].std(0)
      x = (x - mean) / np.maximum(std, 1e-6)
    data = fpe_sweep.TaskData(x_train=x[task.train], y_train=task.labels[task.train],
                             x_test=x[task.test], y_test=task.labels[task.test],
                             num_classes=task.num_classes)
    info = {"num_classes": task.num_classes, "train": int(len(task.train)),
            "test": int(len(task.test)), "embedding_dim": int(emb.shape[1]),
            "majority_test_accuracy": float(np.bincount(data.y_test).max() / len(data.y_test)),
            "features": "MiniLM-L6 mean-pooled sentence embeddings (text, not CLIP images)",
            "model_hash": model.model_hash}
    out[name] = (head_spec(emb.shape[1], task.num_classes, cfg.depth), data, info)
  return out


main = functools.partial(fpe_sweep.real_data_main, "embeddings", __name__, config_from_flags,
                         load_tasks)

if __name__ == "__main__":
  common.run(main)
