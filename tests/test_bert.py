"""MiniLM-L6 forward: against an independent numpy forward, semantics, padding, cache."""
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
from scipy.special import erf

from experiments import embedding_cache
from fpe_jax.data import minilm
from fpe_jax.models import bert

SENTENCES = (
    "A great movie.",
    "An excellent film.",
    "The stock market fell sharply.",
    "It's a long, meandering, occasionally brilliant mess of a picture that never quite "
    "knows what it wants to be.",
)


@pytest.fixture(scope="module")
def model():
  return minilm.load_minilm()


@pytest.fixture(scope="module")
def embed(model):
  forward = jax.jit(bert.sentence_embedding, static_argnums=3)

  def run(texts, **kwargs):
    ids, mask = minilm.tokenize(model.tokenizer, texts, **kwargs)
    return np.asarray(forward(model.params, ids, mask, model.config))
  return run


def _numpy_reference(state, ids, num_heads, eps):
  """Plain numpy BERT on one unpadded sequence, straight from the torch-layout tensors."""
  def ln(x, prefix):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * state[prefix + ".weight"] + state[prefix + ".bias"]

  def linear(x, prefix):  # torch Linear: y = x W^T + b, W [d_out, d_in]
    return x @ state[prefix + ".weight"].T + state[prefix + ".bias"]

  ids = np.asarray(ids)
  x = (state["embeddings.word_embeddings.weight"][ids]
       + state["embeddings.position_embeddings.weight"][np.arange(len(ids))]
       + state["embeddings.token_type_embeddings.weight"][0])
  x = ln(x, "embeddings.LayerNorm").astype(np.float64)
  layer = 0
  while f"encoder.layer.{layer}.attention.self.query.weight" in state:
    p = f"encoder.layer.{layer}."
    q = linear(x, p + "attention.self.query")
    k = linear(x, p + "attention.self.key")
    v = linear(x, p + "attention.self.value")
    head = q.shape[1] // num_heads
    context = np.zeros_like(q)
    for h in range(num_heads):
      cols = slice(h * head, (h + 1) * head)
      scores = q[:, cols] @ k[:, cols].T / np.sqrt(head)
      weights = np.exp(scores - scores.max(-1, keepdims=True))
      weights /= weights.sum(-1, keepdims=True)
      context[:, cols] = weights @ v[:, cols]
    x = ln(x + linear(context, p + "attention.output.dense"), p + "attention.output.LayerNorm")
    pre = linear(x, p + "intermediate.dense")
    hidden = 0.5 * pre * (1.0 + erf(pre / np.sqrt(2.0)))
    x = ln(x + linear(hidden, p + "output.dense"), p + "output.LayerNorm")
    layer += 1
  pooled = x.mean(0)
  return pooled / np.linalg.norm(pooled)


def test_matches_independent_numpy_forward(model, embed):
  state = load_file(str(model.model_dir / "model.safetensors"))
  state = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in state.items()}
  got = embed(SENTENCES)  # one padded batch
  assert got.shape == (len(SENTENCES), 384)
  for row, text in enumerate(SENTENCES):
    ids = model.tokenizer.encode(text).ids
    want = _numpy_reference(state, ids, model.config.num_heads, model.config.layer_norm_eps)
    cosine = float(got[row] @ want / np.linalg.norm(got[row]))
    assert cosine > 0.9999, (text, cosine)
    np.testing.assert_allclose(got[row], want, atol=2e-4)


def test_semantic_neighbours(embed):
  great, excellent, stocks = embed(SENTENCES[:3])
  np.testing.assert_allclose(np.linalg.norm([great, excellent, stocks], axis=1), 1.0, atol=1e-5)
  assert great @ excellent > great @ stocks + 0.3


def test_padding_invariance(embed):
  alone = embed(SENTENCES[:1])  # no padding at all
  batch = embed(SENTENCES, pad_to=96)  # padded to the longest and then some
  np.testing.assert_allclose(batch[0], alone[0], atol=1e-5)


def test_all_padding_row_is_zero(model):
  ids = np.zeros((2, 8), np.int32)
  mask = np.zeros((2, 8), np.int32)
  mask[0, :3] = 1
  ids[0, :3] = [101, 2307, 102]
  out = np.asarray(bert.sentence_embedding(model.params, ids, mask, model.config))
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out[1], 0.0)


def test_layout_and_tokenize_errors(model):
  layers = model.params["layers"]
  assert layers["ffn_in"]["w"].shape == (6, 384, 1536)  # [L, d_in, d_out]
  assert layers["ffn_out"]["w"].shape == (6, 1536, 384)
  ids, mask = minilm.tokenize(model.tokenizer, ["a", "a b c"], pad_to_multiple_of=16)
  assert ids.shape == (2, 16) and mask.sum(1).tolist() == [3, 5]
  with pytest.raises(ValueError, match="pad_to"):
    minilm.tokenize(model.tokenizer, ["a b c d"], pad_to=2)
  long = model.tokenizer.encode("word " * 1000).ids
  assert len(long) == model.max_length == 256


def test_missing_package_message(monkeypatch):
  monkeypatch.setattr(minilm.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="install_data.sh"):
    minilm.model_dir()


def test_embedding_cache_roundtrip(model, tmp_path):
  lines = []
  texts = list(SENTENCES[:3])
  first = embedding_cache.cached_embeddings(texts, model=model, cache_dir=tmp_path,
                                            batch_size=2, log=lines.append)
  assert any("computing" in line for line in lines)
  assert any("texts/s" in line and "left" in line for line in lines)
  lines.clear()
  second = embedding_cache.cached_embeddings(texts, model=model, cache_dir=tmp_path,
                                             log=lines.append)
  assert any("cache hit" in line for line in lines)
  np.testing.assert_array_equal(first, second)
  # Embedding order follows the input order despite the length-sorted batches.
  np.testing.assert_allclose(first, embedding_cache.embed_texts(
      model, texts[::-1], batch_size=3, log=lambda _: None)[::-1], atol=1e-5)
  # Different texts -> a different key, so a second file.
  embedding_cache.cached_embeddings(texts[:2], model=model, cache_dir=tmp_path,
                                    log=lines.append)
  assert len(list(tmp_path.glob("*.npy"))) == 2


def _damage_truncate(path):
  path.write_bytes(path.read_bytes()[:100])


def _damage_garbage(path):
  path.write_bytes(b"not an npy file at all")


def _damage_one_value(path):  # a valid .npy whose values no longer match the checksum
  emb = np.load(path)
  emb[0, 0] += 1.0
  np.save(path, emb)


def _damage_dtype(path):
  np.save(path, np.load(path).astype(np.float64))


def _damage_record(path):
  path.with_suffix(".json").unlink()


@pytest.mark.parametrize("damage, reason", [
    (_damage_truncate, "unreadable"), (_damage_garbage, "unreadable"),
    (_damage_one_value, "does not match its record (sha256)"),
    (_damage_dtype, "holds float64"), (_damage_record, "unreadable"),
])
def test_a_damaged_cache_entry_is_recomputed_and_says_why(model, tmp_path, damage, reason):
  texts = list(SENTENCES[:3])
  first = embedding_cache.cached_embeddings(texts, model=model, cache_dir=tmp_path,
                                            log=lambda _: None)
  (path,) = tmp_path.glob("*.npy")
  damage(path)
  lines = []
  again = embedding_cache.cached_embeddings(texts, model=model, cache_dir=tmp_path,
                                            log=lines.append)
  assert any(reason in line and "recomputing" in line for line in lines), lines
  np.testing.assert_array_equal(again, first)
  lines.clear()  # and the recomputed entry is intact again
  embedding_cache.cached_embeddings(texts, model=model, cache_dir=tmp_path, log=lines.append)
  assert any("cache hit" in line for line in lines)
