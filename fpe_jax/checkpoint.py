"""Orbax checkpoints of pytrees of arrays, one directory of numbered steps per phase.

Orbax writes each step to a temporary directory and renames it when complete, so a
process killed mid-save leaves the previous step intact: `latest_step` only ever sees
finished checkpoints. Saves are synchronous (no background thread), so a step a caller
has logged as saved is on disk and a failed save raises in the caller. A step damaged
after it was written (a disk fault, a hand-edited file) is skipped by `restore_latest`,
which falls back to the newest step that restores.
"""

import contextlib
import os
import sys

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpoints:
  """The numbered checkpoints of one training phase in `directory`."""

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        # Synchronous saves: a failed save (a full disk) raises here, in the caller's
        # thread, instead of being logged at length by orbax's background thread.
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, tree) -> None:
    with _orbax_errors_raised_not_logged():
      self._manager.save(step, args=ocp.args.StandardSave(tree), force=True)
      self._manager.wait_until_finished()

  def restore(self, step: int, like=None):
    """Restores step `step` into the structure, shapes and dtypes of `like`, or as it was
    saved (numpy arrays) when `like` is None (a state whose shapes vary, such as encoded
    text)."""
    abstract = None if like is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def restore_latest(self, like=None) -> tuple[int | None, object]:
    """The newest step that restores, and its state: (None, like) if none does.

    A step that fails to restore is reported on stderr and skipped, so one damaged
    checkpoint costs the chunks since the previous one, not the run.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        return step, self.restore(step, like)
      except Exception as e:  # noqa: BLE001 (orbax raises many types for a damaged step)
        print(f"warning: checkpoint step {step} in {self._manager.directory} does not "
              f"restore ({type(e).__name__}); falling back to an earlier step",
              file=sys.stderr)
    return None, like

  def close(self) -> None:
    self._manager.close()


@contextlib.contextmanager
def _orbax_errors_raised_not_logged():
  """Orbax logs a failed write (a full disk) at length from its worker threads and then
  raises it here; the caller reports the exception, so the log is noise."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.FATAL)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)
