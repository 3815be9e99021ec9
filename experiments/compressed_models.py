"""Saved compressed models: each Sparse Expansion configuration's FFNs, with orbax.

`experiments.sparse_expansion --save_models` writes, under the run directory,
models/<configuration>/ (`folder_name`: "sparse_expansion__50pct__K=2") holding
  model.json  what the model is: its configuration, the compressed layers, the run's
              setup (windows, seed, batch size: what `experiments.lm_eval` needs to
              reproduce the perplexity), the base GGUF's sha256, the perplexity the run
              reported, and the sha256 of every array and of every file saved;
  ffns/       the orbax checkpoint {"layer_<l>": {"w_gate" | "w_up" | "w_down":
              {"w", "mask"[, "router": {"mean", "components", "centroids"}]}}}.
A model is written to <folder>.tmp and renamed when complete, so a folder that exists is
whole; `load` still checks every array against model.json and the base model's sha256,
so a damaged copy or a model of another GGUF is refused on one line, never used.

While a configuration runs, `BlockCheckpoints` keeps the pipeline's state after each
compressed block (fpe_jax.sparse_expansion.PipelineState) under the run's
checkpoints/<folder_name>/, so a killed run resumes at its last finished block.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from fpe_jax import checkpoint, experts
from fpe_jax import sparse_expansion as se
from fpe_jax.data.hashing import file_digest

Params = dict
_BANKS = ("w_gate", "w_up", "w_down")


def folder_name(configuration: str) -> str:
  """A configuration's name ("sparse_expansion/50%/K=2") as one folder name
  ("sparse_expansion__50pct__K=2")."""
  return configuration.replace("/", "__").replace("%", "pct")


def file_sha256(path: str) -> str:
  return file_digest(path).hexdigest()


def _tree(ffns: dict[int, Params]) -> dict:
  """{layer: {name: ExpertBank}} as the plain nested dict orbax saves (no None leaves)."""
  def bank(b: experts.ExpertBank) -> dict:
    out = {"w": np.asarray(b.w), "mask": np.asarray(b.mask)}
    if b.router is not None:
      out["router"] = {k: np.asarray(v) for k, v in b.router.items()}
    return out
  return {f"layer_{layer}": {name: bank(ffn[name]) for name in _BANKS}
          for layer, ffn in sorted(ffns.items())}


def _ffns(tree: dict) -> dict[int, Params]:
  def bank(d: dict) -> experts.ExpertBank:
    router = None if "router" not in d else {k: jax.numpy.asarray(v)
                                             for k, v in d["router"].items()}
    return experts.ExpertBank(w=jax.numpy.asarray(d["w"]), mask=jax.numpy.asarray(d["mask"]),
                              router=router)
  return {int(key.removeprefix("layer_")): {name: bank(ffn[name]) for name in _BANKS}
          for key, ffn in tree.items()}


def _arrays_sha256(tree: dict) -> str:
  """sha256 over every array of the tree, in path order, with its path, dtype and shape."""
  digest = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0],
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}|".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def _files_sha256(folder: str) -> dict[str, str]:
  """{path relative to folder: sha256} of every file under folder ({} if none)."""
  return {os.path.relpath(os.path.join(root, name), folder):
          file_sha256(os.path.join(root, name))
          for root, _, names in os.walk(folder) for name in sorted(names)}


def save(folder: str, ffns: dict[int, Params], record: dict) -> None:
  """Writes the model ({layer: ffn}) and its record (configuration, setup, base model,
  perplexity) to `folder`, atomically: into folder.tmp, renamed when complete."""
  tree = _tree(ffns)
  tmp = folder + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  if tree:
    # Closed as it leaves the block: orbax's threads must not outlive the call (at exit
    # they print "Event loop is closed" tracebacks under the one-line errors).
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.abspath(os.path.join(tmp, "ffns")), tree)
      checkpointer.wait_until_finished()
  meta = {**record, "layers": sorted(ffns), "arrays_sha256": _arrays_sha256(tree),
          "files_sha256": _files_sha256(os.path.join(tmp, "ffns"))}
  with open(os.path.join(tmp, "model.json"), "w") as f:
    json.dump(meta, f, indent=1)
  shutil.rmtree(folder, ignore_errors=True)
  os.rename(tmp, folder)


def read_record(folder: str) -> dict:
  """The model.json of a saved model; ValueError when `folder` is not one."""
  path = os.path.join(folder, "model.json")
  if not os.path.isfile(path):
    raise ValueError(f"{folder} is not a saved model (no model.json): give a "
                     "models/<configuration> folder of a --save_models run, or 'dense'")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} does not read as a model record ({e})") from None


def load(folder: str, base_sha256: str) -> tuple[dict[int, Params], dict]:
  """The saved model's FFNs and record, checked against its base model and its arrays.

  Args:
    folder: a models/<configuration> folder written by `save`.
    base_sha256: the sha256 of the GGUF the caller loaded as the base model.

  Raises:
    ValueError: one line, for a folder that is not a saved model, a model saved from
      another GGUF, or a checkpoint that does not restore or whose arrays changed.
  """
  meta = read_record(folder)
  saved_base = meta.get("base_model", {}).get("sha256")
  if saved_base != base_sha256:
    raise ValueError(f"{folder} was saved from another base model (GGUF sha256 "
                     f"{str(saved_base)[:12]}..., the loaded one is {base_sha256[:12]}...): "
                     "give its --model_path")
  # The files first: a truncated or altered checkpoint is refused before orbax reads it
  # (orbax's threads would print tracebacks at exit under the one-line error).
  files = os.path.join(folder, "ffns")
  for name, want in meta.get("files_sha256", {}).items():
    path = os.path.join(files, name)
    if not os.path.isfile(path) or file_sha256(path) != want:
      raise ValueError(f"the checkpoint in {folder} is damaged or truncated ({name} is missing "
                       "or changed); rerun the configuration")
  tree = {}
  if meta["layers"]:
    try:
      with ocp.StandardCheckpointer() as checkpointer:  # closed even when restore fails
        tree = checkpointer.restore(os.path.abspath(os.path.join(folder, "ffns")))
    except Exception as e:  # noqa: BLE001 -- orbax raises many types for a damaged checkpoint
      raise ValueError(f"the checkpoint in {folder} does not restore, truncated or damaged "
                       f"({type(e).__name__}); rerun the configuration") from None
  if _arrays_sha256(tree) != meta["arrays_sha256"]:
    raise ValueError(f"the arrays in {folder} are not the ones saved (sha256 differs): the "
                     "copy is damaged; rerun the configuration")
  return _ffns(tree), meta


class BlockCheckpoints:
  """One configuration's pipeline state after each of its compressed blocks (orbax steps
  numbered by blocks done, the newest two kept), for `run_pipeline(resume=...)`.

  A step holds the PRNG key, the calibration and held-out hidden states, the layer hook's
  records (JSON, as bytes) and, for a run that keeps its model, the FFNs so far. At paper
  scale (128 x 2048 calibration tokens) a step is ~1.2 GB of hidden states.
  """

  def __init__(self, directory: str):
    self.directory = directory
    self._store = checkpoint.Checkpoints(directory)

  def latest(self, keep_ffns: bool) -> se.PipelineState | None:
    """The newest state that restores (a damaged step is skipped), or None."""
    step, tree = self._store.restore_latest()
    if step is None:
      return None
    ffns = _ffns(tree["ffns"]) if "ffns" in tree else None
    return se.PipelineState(
        blocks_done=int(tree["blocks_done"]),
        key=jax.random.wrap_key_data(jax.numpy.asarray(tree["key"])),
        h_cal=tree.get("h_cal"), h_eval=tree["h_eval"],
        records=json.loads(bytes(tree["records"]).decode()),
        ffns=(ffns or {}) if keep_ffns else None)

  def save(self, state: se.PipelineState) -> None:
    tree = {"blocks_done": np.int32(state.blocks_done),
            "key": np.asarray(jax.random.key_data(state.key)),
            "h_eval": np.asarray(state.h_eval),
            "records": np.frombuffer(json.dumps(state.records).encode(), np.uint8)}
    if state.h_cal is not None:
      tree["h_cal"] = np.asarray(state.h_cal)
    if state.ffns:
      tree["ffns"] = _tree(state.ffns)
    self._store.save(state.blocks_done, tree)

  def delete(self) -> None:
    """Removes the configuration's checkpoints (once its row is logged)."""
    self._store.close()
    shutil.rmtree(self.directory, ignore_errors=True)
