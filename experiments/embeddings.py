r"""FPE on MLP heads over frozen MiniLM sentence embeddings (Rotten Tomatoes).

  python -m experiments.embeddings --flagfile=experiments/flags/embeddings_quick.flags

The paper's heads over frozen CLIP image embeddings, with what is offline here in their
place: MiniLM-L6 sentence embeddings (384-d, text, not images) of the Rotten Tomatoes
review snippets, computed once and cached on disk (experiments/embedding_cache.py).
Tasks (fpe_jax/data/rotten_tomatoes.py): "sentiment" (fresh vs rotten, 2 classes) and
"movie" (which of 338 movies a snippet reviews: the high-load case). The head is an MLP
[384, width, classes] whose hidden layer FPE expands; every arm (dense, FPE random /
feature / overlap, DropConnect, larger dense models) is described in
experiments/fpe_arms.py. results.json holds accuracy, capacity and |cos| per run and
their mean ± std over seeds, the gain over dense and the equivalent dense size.
"""

import time

import numpy as np
from absl import flags

from experiments import common, embedding_cache, fpe_arms
from fpe_jax.data import minilm, rotten_tomatoes

FLAGS = flags.FLAGS

flags.DEFINE_list("tasks", list(rotten_tomatoes.TASKS),
                  f"Tasks among {', '.join(rotten_tomatoes.TASKS)}.")
flags.DEFINE_integer("depth", 1, "Hidden layers of the head (all expanded, one budget).")
flags.DEFINE_float("test_fraction", 0.2, "Share of each class held out for test.")
flags.DEFINE_integer("data_seed", 0, "Seed of the stratified train/test split.")
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
fpe_arms.define_sweep_flags(__name__, budget="per_layer")

common.flag_validator("tasks", lambda v: bool(v) and set(v) <= set(rotten_tomatoes.TASKS),
                      f"a comma list of tasks among {', '.join(rotten_tomatoes.TASKS)}")
common.flag_validator("depth", lambda v: v >= 1, "must be >= 1")
common.flag_validator("test_fraction", lambda v: 0 < v < 1, "must be in (0, 1)")
common.flag_validator("max_rows", lambda v: v >= 0, "must be >= 0 (0: all rows)")
common.flag_validator("embed_batch", lambda v: v >= 1, "must be >= 1")


def head_spec(d_in: int, num_classes: int, depth: int) -> fpe_arms.ModelSpec:
  return fpe_arms.ModelSpec(head_sizes=lambda h: [d_in] + [h] * depth + [num_classes],
                            expand_layers=tuple(range(depth)))


def load_tasks() -> dict:
  """Reviews, embeddings (cached) and the task splits; raises UsageError on missing data."""
  try:
    reviews = rotten_tomatoes.load_reviews()
    model = minilm.load_minilm()
  except FileNotFoundError as e:
    raise common.UsageError(f"--tasks: {e}") from e
  if FLAGS.max_rows:
    reviews = rotten_tomatoes.Reviews(texts=reviews.texts[:FLAGS.max_rows],
                                      fresh=reviews.fresh[:FLAGS.max_rows],
                                      movies=reviews.movies[:FLAGS.max_rows])
  tasks = {}
  for name in FLAGS.tasks:
    task = rotten_tomatoes.make_task(reviews, name, test_fraction=FLAGS.test_fraction,
                                     seed=FLAGS.data_seed)
    common.validate("max_rows", task.num_classes >= 2,
                    f"{FLAGS.max_rows} rows leave task {name!r} fewer than 2 classes")
    tasks[name] = task
  # All tasks are rows of the same snippets: one embedding pass (and cache entry) for all.
  emb = embedding_cache.cached_embeddings(reviews.texts, model=model,
                                          cache_dir=FLAGS.cache_dir or None,
                                          batch_size=FLAGS.embed_batch,
                                          log=lambda line: print(line, flush=True))
  out = {}
  for name, task in tasks.items():
    x = emb[task.rows]
    if FLAGS.standardize:
      mean, std = x[task.train].mean(0), x[task.train].std(0)
      x = (x - mean) / np.maximum(std, 1e-6)
    data = fpe_arms.TaskData(x_train=x[task.train], y_train=task.labels[task.train],
                             x_test=x[task.test], y_test=task.labels[task.test],
                             num_classes=task.num_classes)
    info = {"num_classes": task.num_classes, "train": int(len(task.train)),
            "test": int(len(task.test)), "embedding_dim": int(emb.shape[1]),
            "majority_test_accuracy": float(np.bincount(data.y_test).max() / len(data.y_test)),
            "features": "MiniLM-L6 mean-pooled sentence embeddings (text, not CLIP images)",
            "model_hash": model.model_hash}
    out[name] = (head_spec(emb.shape[1], task.num_classes, FLAGS.depth), data, info)
  return out


def main(argv):
  if len(argv) > 1:
    raise common.UsageError(f"unexpected arguments {argv[1:]}; use --flags")
  common.maybe_initialize_distributed()
  settings = fpe_arms.settings_from_flags()
  t0 = time.perf_counter()
  tasks = load_tasks()
  print(f"data ready in {time.perf_counter() - t0:.0f} s", flush=True)
  fpe_arms.run_all("embeddings", __name__, tasks, settings)


if __name__ == "__main__":
  common.run(main)
