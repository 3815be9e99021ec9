"""Llama forward on the real SmolLM2-135M GGUF: greedy decoding, a plain-numpy reference, the
tokenizer, perplexity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpe_jax.data import gguf_loader
from fpe_jax.models import llama

TEXT = "It is a truth universally acknowledged, that"


@pytest.fixture(scope="module")
def checkpoint():
  ckpt = gguf_loader.load_llama_gguf()
  return ckpt._replace(params=jax.device_put(ckpt.params))


@pytest.fixture(scope="module")
def text_logits(checkpoint):
  """(tokens [seq], jitted llama.forward logits [seq, vocab]) of TEXT, shared by two tests."""
  tokens = np.asarray(checkpoint.tokenizer.encode(TEXT).ids)
  logits = jax.jit(llama.forward, static_argnums=0)(checkpoint.config, checkpoint.params,
                                                    jnp.asarray(tokens)[None])[0]
  return tokens, logits


def _numpy_forward(ckpt, tokens):
  """Independent float64 numpy forward: RoPE through complex numbers on (2i, 2i+1) pairs,
  attention one head at a time with an explicit KV-head lookup."""
  cfg = ckpt.config
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), ckpt.params)
  hd, seq = cfg.head_dim, len(tokens)

  def norm(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps) * w

  def rope(x):  # [seq, heads, hd]
    z = x[..., 0::2] + 1j * x[..., 1::2]
    theta = cfg.rope_base ** (-np.arange(hd // 2) * 2.0 / hd)
    z = z * np.exp(1j * np.arange(seq)[:, None, None] * theta)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out

  h = p["embed"][tokens]
  for layer in range(cfg.n_layers):
    b = {k: v[layer] for k, v in p["blocks"].items()}
    x = norm(h, b["attn_norm"])
    q = rope((x @ b["wq"]).reshape(seq, cfg.n_heads, hd))
    k = rope((x @ b["wk"]).reshape(seq, cfg.n_kv_heads, hd))
    v = (x @ b["wv"]).reshape(seq, cfg.n_kv_heads, hd)
    heads = []
    for head in range(cfg.n_heads):
      kv = head // (cfg.n_heads // cfg.n_kv_heads)
      s = q[:, head] @ k[:, kv].T / np.sqrt(hd)
      s[np.triu_indices(seq, 1)] = -np.inf
      a = np.exp(s - s.max(axis=1, keepdims=True))
      heads.append((a / a.sum(axis=1, keepdims=True)) @ v[:, kv])
    h = h + np.concatenate(heads, axis=1) @ b["wo"]
    x = norm(h, b["ffn_norm"])
    g = x @ b["w_gate"]
    h = h + ((g / (1 + np.exp(-g))) * (x @ b["w_up"])) @ b["w_down"]
  return norm(h, p["final_norm"]) @ p["embed"].T


def test_config_matches_data_card(checkpoint):
  cfg = checkpoint.config
  assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab_size) == (
      30, 576, 9, 3, 1536, 49152)
  assert cfg.rope_base == 1e5
  blocks = checkpoint.params["blocks"]
  assert blocks["w_gate"].shape == (30, 576, 1536)
  assert blocks["w_down"].shape == (30, 1536, 576)
  assert blocks["wk"].shape == (30, 576, 192)
  assert checkpoint.params["embed"].shape == (49152, 576)


def test_greedy_capital_of_france(checkpoint):
  tok = checkpoint.tokenizer
  prompt = jnp.asarray(tok.encode("The capital of France is").ids)
  out = llama.greedy_decode(checkpoint.config, checkpoint.params, prompt, 1)
  assert tok.decode([int(out[0])]) == " Paris"


def test_logits_match_numpy_reference(checkpoint, text_logits):
  tokens, ours = text_logits
  ref = _numpy_forward(checkpoint, tokens)
  rel = np.linalg.norm(np.asarray(ours, np.float64) - ref) / np.linalg.norm(ref)
  assert rel < 1e-4, rel
  np.testing.assert_array_equal(np.argmax(ours, -1), np.argmax(ref, -1))


def test_tokenizer_round_trips_text(checkpoint):
  tok = checkpoint.tokenizer
  text = ("Elizabeth's  1813 letter:\n\n\t\"No -- ünïcödé, café & 12345!\" <|im_start|>"
          "  trailing ")
  ids = tok.encode(text).ids
  assert tok.decode(ids, skip_special_tokens=False) == text
  # Digits are split one by one; the chat marker is one special token.
  assert [tok.id_to_token(i) for i in tok.encode("12345").ids] == list("12345")
  assert tok.encode("<|im_start|>").ids == [1]
  # Known GPT-2-style pieces: a leading space is part of the next word.
  assert tok.encode("The capital of France is").ids == [504, 3575, 282, 4649, 314]


def test_perplexity_batched_matches_per_window(checkpoint):
  cfg, params = checkpoint.config, checkpoint.params
  ids = checkpoint.tokenizer.encode(
      "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own "
      "amusement, never took up any book but the Baronetage; there he found occupation").ids
  windows = np.asarray(ids[:24], np.int32).reshape(3, 8)
  ppl = llama.perplexity(cfg, params, windows, batch_size=2)
  nll_fn = jax.jit(lambda p, t: llama.token_nll(llama.forward(cfg, p, t), t))
  nlls = [np.asarray(nll_fn(params, w[None])) for w in windows]
  np.testing.assert_allclose(ppl, np.exp(np.mean(np.concatenate(nlls))), rtol=1e-5)
  # The chunked projection + NLL, with a last chunk of 1 of 5 positions (3 x 7 = 21):
  h = llama.hidden_states(cfg, params, jnp.asarray(windows))
  np.testing.assert_allclose(llama.hidden_nll(cfg, params, h, windows, chunk_tokens=5),
                             np.concatenate(nlls), rtol=1e-5, atol=1e-5)
  # The model predicts English far better than uniform over the vocabulary.
  assert 1.0 < ppl < 1000.0


def test_block_functions_compose_to_forward(checkpoint, text_logits):
  cfg, params = checkpoint.config, checkpoint.params
  tokens, logits = jnp.asarray(text_logits[0])[None], text_logits[1]
  attention = jax.jit(llama.attention_sublayer, static_argnums=0)
  ffn_input = jax.jit(llama.ffn_input, static_argnums=0)
  h = llama.embed(params, tokens)
  for layer in range(cfg.n_layers):
    block = llama.block_params(params, layer)
    h = attention(cfg, block, h)
    x = ffn_input(cfg, block, h)
    # A replacement FFN that recomputes the dense FFN from captured activations.
    inter = llama.swiglu(x @ block["w_gate"], x @ block["w_up"])
    h = llama.ffn_sublayer(cfg, block, h, ffn=lambda _x, inter=inter, b=block: inter @ b["w_down"])
  np.testing.assert_allclose(llama.logits_from_hidden(cfg, params, h)[0], logits, rtol=2e-4,
                             atol=2e-4)


def test_bad_config_is_rejected():
  with pytest.raises(ValueError, match="n_kv_heads"):
    llama.LlamaConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=4, n_kv_heads=3, d_ff=16)


def test_missing_model_names_install_command(tmp_path):
  with pytest.raises(FileNotFoundError, match="bash scripts/install_data.sh"):
    gguf_loader.load_llama_gguf(tmp_path / "absent.gguf")
