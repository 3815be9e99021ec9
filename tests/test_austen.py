"""Austen text: parsing the janeaustenr lazy-load database, disjoint deterministic splits."""

import numpy as np
import pytest

from fpe_jax.data import austen


@pytest.fixture(scope="module")
def novels():
  return austen.load_novels()


def _encode(text):
  # A cheap deterministic "tokenizer" (bytes) keeps these tests independent of the GGUF.
  return list(text.encode("utf-8"))


def test_six_novels_with_known_openings(novels):
  assert set(novels) == set(austen.NOVELS)
  assert novels["persuasion"].startswith("Persuasion\n\n")
  assert novels["prideprejudice"].startswith("PRIDE AND PREJUDICE")
  assert "It is a truth universally acknowledged, that a single man in possession of a good " \
      "fortune, must be in want of a wife." in novels["prideprejudice"]
  total = sum(len(t) for t in novels.values())
  assert 3.7e6 < total < 4.1e6, total  # ~3.95M characters of source lines, minus wrapping
  assert "\n\n\n" not in novels["emma"]


def test_splits_are_disjoint_and_deterministic(novels):
  kwargs = dict(calib_windows=16, calib_window=64, eval_window=64, eval_windows=10, seed=3)
  calib, held_out = austen.calibration_and_eval_windows(_encode, **kwargs)
  calib2, held_out2 = austen.calibration_and_eval_windows(_encode, **kwargs)
  assert calib.shape == (16, 64) and held_out.shape == (10, 64)
  assert calib.dtype == np.int32
  np.testing.assert_array_equal(calib, calib2)
  np.testing.assert_array_equal(held_out, held_out2)
  other, _ = austen.calibration_and_eval_windows(_encode, **{**kwargs, "seed": 4})
  assert not np.array_equal(calib, other)
  # Held-out windows are Persuasion from its start, consecutive and non-overlapping.
  persuasion = np.asarray(_encode(novels["persuasion"]))
  np.testing.assert_array_equal(held_out.reshape(-1), persuasion[:640])
  # Every calibration window is a substring of exactly the calibration novels, never
  # Persuasion.
  calib_text = [bytes(w.astype(np.uint8)).decode("utf-8", "ignore")[2:-2] for w in calib]
  for piece in calib_text:
    assert any(piece in novels[n] for n in austen.CALIBRATION_NOVELS)
    assert piece not in novels["persuasion"]


def test_random_windows_stay_inside_streams():
  streams = [np.arange(0, 10), np.arange(100, 150)]
  windows = austen.random_windows(streams, num_windows=200, window=8, seed=0)
  # Within a stream values step by one: a window crossing streams would jump.
  assert np.all(np.diff(windows, axis=1) == 1)
  assert set(np.unique(windows[:, 0] >= 100)) == {False, True}


def test_bad_arguments_name_the_argument():
  with pytest.raises(ValueError, match="eval_novel"):
    austen.calibration_and_eval_windows(_encode, calib_windows=1, calib_window=8,
                                        eval_window=8, eval_novel="emma",
                                        calibration_novels=("emma",))
  with pytest.raises(ValueError, match="calibration_novels"):
    austen.calibration_and_eval_windows(_encode, calib_windows=1, calib_window=8,
                                        eval_window=8, calibration_novels=("ulysses",))
  with pytest.raises(ValueError, match="window"):
    austen.consecutive_windows(np.arange(5), window=8)


def test_missing_data_names_install_command(tmp_path):
  with pytest.raises(FileNotFoundError, match="bash scripts/install_data.sh"):
    austen.load_novels(tmp_path)
