"""The transformer: attention against a plain reference, causality, KV cache, generation, loss,
parameter counts, and parity with Hugging Face's LlamaForCausalLM (fp32)."""
import math

import pytest
import torch
import torch.nn.functional as F

from memory3.config import ModelConfig
from memory3.model import IGNORE_INDEX, Transformer
from memory3.model.attention import Attention
from memory3.model.hf import from_llama_state_dict, to_llama_config, to_llama_state_dict
from memory3.model.layers import rotary_tables

GQA = dict(n_heads=4, n_kv_heads=2)    # the tiny preset's own shape
MHA = dict(n_heads=4, n_kv_heads=4)
MQA_ODD_HEAD_DIM = dict(n_heads=4, n_kv_heads=1, head_dim=8)  # head_dim != d_model / n_heads


def tiny(**overrides) -> ModelConfig:
    return ModelConfig.from_name("tiny", **overrides)


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def tokens(cfg: ModelConfig, *shape: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, shape, generator=g)


# ---------------------------------------------------------------- attention vs a plain reference

def reference_attention(attn: Attention, x: torch.Tensor, theta: float) -> torch.Tensor:
    """Self-attention written out plainly in float64: separate q/k/v matmuls, rotary as a complex
    rotation of the pairs (i, i + D/2), KV heads repeated explicitly, explicit causal mask."""
    B, T, _ = x.shape
    H, G, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    x = x.double()
    wq, wk, wv = attn.wqkv.weight.double().split((H * D, G * D, G * D), dim=0)
    q = (x @ wq.T).view(B, T, H, D)
    k = (x @ wk.T).view(B, T, G, D)
    v = (x @ wv.T).view(B, T, G, D)

    freqs = theta ** (-torch.arange(0, D // 2, dtype=torch.float64) * 2 / D)        # (D/2,)
    phase = torch.polar(torch.ones(T, D // 2, dtype=torch.float64),
                        torch.arange(T, dtype=torch.float64)[:, None] * freqs)       # (T, D/2)

    def rotate(t):
        z = torch.complex(t[..., : D // 2], t[..., D // 2:]) * phase[:, None, :]
        return torch.cat([z.real, z.imag], dim=-1)

    q, k = rotate(q), rotate(k)
    out = torch.empty(B, T, H, D, dtype=torch.float64)
    for h in range(H):
        g = h // (H // G)  # consecutive query heads share one KV head
        for b in range(B):
            scores = q[b, :, h] @ k[b, :, g].T / math.sqrt(D)                      # (T, T)
            future = torch.ones(T, T, dtype=torch.bool).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
            out[b, :, h] = torch.softmax(scores, dim=-1) @ v[b, :, g]
    return out.reshape(B, T, H * D) @ attn.wo.weight.double().T


@pytest.mark.parametrize("heads", [GQA, MHA, MQA_ODD_HEAD_DIM], ids=["gqa", "mha", "mqa"])
def test_attention_matches_reference(heads):
    cfg = tiny(**heads)
    torch.manual_seed(0)
    attn = Attention(cfg, layer_idx=0)
    for p in attn.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)  # large enough that softmax is far from uniform
    x = torch.randn(2, 24, cfg.d_model)
    cos, sin = rotary_tables(cfg.head_dim, 24, cfg.rope_theta)
    with torch.no_grad():
        ours = attn(x, cos, sin)
    expected = reference_attention(attn, x, cfg.rope_theta)
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- causality, cache, generation

def test_causal_future_tokens_never_change_past_logits():
    cfg = tiny()
    model = build(cfg)
    x = tokens(cfg, 2, 40)
    with torch.no_grad():
        base = model(x).logits
        for j in (1, 17, 39):
            y = x.clone()
            y[:, j] = (y[:, j] + 1) % cfg.vocab_size
            out = model(y).logits
            torch.testing.assert_close(out[:, :j], base[:, :j], atol=1e-6, rtol=0)
            assert not torch.allclose(out[:, j], base[:, j])  # the changed position does change


def with_shift(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A token_shift model whose gate is not at its zero init, so the shift shows."""
    model = build(cfg, seed)
    with torch.no_grad():
        model.shift.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
    return model


@pytest.mark.parametrize("heads,shift", [(GQA, False), (MHA, False), (GQA, True)],
                         ids=["gqa", "mha", "token-shift"])
def test_kv_cache_matches_full_forward(heads, shift):
    cfg = tiny(**heads, token_shift=shift)
    model = with_shift(cfg) if shift else build(cfg)
    x = tokens(cfg, 2, 22)
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(batch_size=2, max_len=32)
        parts = [model(x[:, :10], cache=cache).logits]            # prefill (is_causal path)
        for t in range(10, 15):                                    # single-token steps (no mask)
            parts.append(model(x[:, t:t + 1], cache=cache).logits)
        parts.append(model(x[:, 15:22], cache=cache).logits)      # chunk: explicit mask path
    assert cache.length == 22
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_token_shift_adds_the_gated_previous_embedding():
    cfg = tiny(token_shift=True)
    model = with_shift(cfg)
    x = tokens(cfg, 2, 9)
    e = model.embed.weight
    expected = e[x].clone()
    expected[:, 1:] += model.shift * e[x[:, :-1]]    # position 0 has no previous token
    torch.testing.assert_close(model.embed_tokens(x), expected)
    plain = build(tiny())
    assert plain.shift is None and torch.equal(plain.embed_tokens(x), plain.embed.weight[x])
    # A fresh model starts as the plain one: the gate is 0.
    assert torch.equal(build(cfg).shift, torch.zeros(cfg.d_model))
    with pytest.raises(ValueError, match="token_shift"):
        to_llama_config(cfg)
    with pytest.raises(ValueError, match="token_shift"):
        to_llama_state_dict(model, cfg)


def copying_loss(shift: bool, steps: int = 1200, V: int = 64, width: int = 40) -> float:
    """Train a 1-layer model on [random prefix, span, span] (span 8-32 random tokens, so the copy
    distance varies and no fixed-offset head can solve it); return its loss on second copies."""
    torch.manual_seed(0)
    model = Transformer(tiny(vocab_size=V, n_layers=1, token_shift=shift))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0)
    g = torch.Generator().manual_seed(0)

    def batch(n: int, k: int) -> torch.Tensor:
        span = torch.randint(0, V, (n, k), generator=g)
        return torch.cat([torch.randint(0, V, (n, width - k), generator=g), span, span], dim=1)

    for _ in range(steps):
        x = batch(32, int(torch.randint(8, 33, (1,), generator=g)))
        loss = model(x[:, :-1], x[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    losses = []
    with torch.no_grad():
        for k in (11, 20, 29):
            x = batch(128, k)
            out = F.cross_entropy(model(x[:, :-1]).logits.transpose(1, 2), x[:, 1:],
                                  reduction="none")
            losses.append(out[:, width:].mean().item())  # predicting the second copy's tokens 2..k
    return sum(losses) / len(losses)


def test_token_shift_lets_one_layer_copy_from_context():
    """An induction head needs to know each key's previous token: plain attention gets that only
    from a layer below, token_shift from the input. One layer, same data, same steps (~45 s)."""
    uniform = math.log(64)
    assert copying_loss(shift=True) < 0.3 * uniform
    assert copying_loss(shift=False) > 0.7 * uniform


def test_last_only_logits_and_cache_reset():
    cfg = tiny()
    model = build(cfg)
    x = tokens(cfg, 2, 12)
    with torch.no_grad():
        full = model(x).logits
        torch.testing.assert_close(model(x, last_only=True).logits, full[:, -1:])
        cache = model.new_cache(batch_size=2, max_len=12)
        model(x[:, :5], cache=cache)
        cache.reset()  # reused from position 0, as rag decoding does at every chunk
        torch.testing.assert_close(model(x, cache=cache, last_only=True).logits, full[:, -1:],
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no loss"):
        model(x, x, last_only=True)


def test_kv_cache_overflow_and_max_seq_len_raise():
    cfg = tiny(max_seq_len=16)
    model = build(cfg)
    cache = model.new_cache(batch_size=1, max_len=8)
    with torch.no_grad(), pytest.raises(ValueError, match="overflow"):
        model(tokens(cfg, 1, 9), cache=cache)
    with torch.no_grad(), pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(cfg, 1, 17))


def test_greedy_generate_equals_stepwise_argmax_of_full_forwards():
    cfg = tiny()
    model = build(cfg)
    prompt = tokens(cfg, 2, 5)
    out = model.generate(prompt, max_new_tokens=12, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            nxt = model(seq).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert torch.equal(out, seq)


def test_generate_stops_at_max_seq_len_and_pads_after_eos():
    cfg = tiny(max_seq_len=12)
    model = build(cfg)
    prompt = tokens(cfg, 2, 5)
    assert model.generate(prompt, 100, temperature=0).shape == (2, 12)
    greedy = model.generate(prompt, 4, temperature=0)
    eos = int(greedy[0, 5])  # make row 0's first new token the end of sequence
    out = model.generate(prompt, 4, temperature=0, eos_id=eos)
    assert (out[0, 5:] == eos).all()
    row1 = greedy[1, 5:]
    cut = int((row1 == eos).nonzero()[0]) if (row1 == eos).any() else len(row1)
    assert torch.equal(out[1, 5:5 + cut], row1[:cut])


# ---------------------------------------------------------------- loss

def test_loss_is_cross_entropy_and_respects_ignore_index():
    cfg = tiny()
    model = build(cfg)
    x = tokens(cfg, 3, 16)
    targets = tokens(cfg, 3, 16, seed=2)
    targets[0, :5] = IGNORE_INDEX
    targets[2, -3:] = IGNORE_INDEX
    with torch.no_grad():
        out = model(x, targets)
    logits = out.logits.double()
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss.double(), expected, atol=1e-6, rtol=1e-6)
    # By hand: mean negative log-likelihood over the kept positions only.
    keep = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1)[keep]
    by_hand = -logp.gather(-1, targets[keep][:, None]).mean()
    torch.testing.assert_close(out.loss.double(), by_hand, atol=1e-6, rtol=1e-6)
    assert keep.sum() == 3 * 16 - 8


# ---------------------------------------------------------------- parameters

def test_tied_embeddings_share_storage():
    cfg = tiny(tie_embeddings=True)
    model = build(cfg).train()
    assert model.lm_head.weight is model.embed.weight
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = tokens(cfg, 2, 8)
    model(x, x).loss.backward()
    opt.step()
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, model.embed.weight)
    names = [n for n, _ in model.named_parameters()]
    assert "embed.weight" in names and "lm_head.weight" not in names  # listed (and stepped) once


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("preset", ["tiny", "mini", "small"])
def test_param_counts_match_config(preset, tied, shift):
    cfg = ModelConfig.from_name(preset, tie_embeddings=tied, token_shift=shift)
    with torch.device("meta"):
        model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())  # shared parameters are listed once
    non_emb = sum(p.numel() for n, p in model.named_parameters()
                  if not n.startswith(("embed.", "lm_head.")))
    assert total == cfg.n_params
    assert non_emb == cfg.n_params_non_embedding


def test_reference_2_4b_shape_on_meta():
    cfg = ModelConfig.from_name("2.4b")
    with torch.device("meta"):
        model = Transformer(cfg)
    non_emb = sum(p.numel() for n, p in model.named_parameters()
                  if not n.startswith(("embed.", "lm_head.")))
    assert non_emb == cfg.n_params_non_embedding
    assert abs(non_emb - 2.433e9) / 2.433e9 < 1e-3
    assert sum(p.numel() for p in model.parameters()) == cfg.n_params


def test_meta_init_then_materialise_matches_eager_build():
    """Rotary tables must not live in (uninitialised) storage of a meta-built model."""
    cfg = tiny()
    model = build(cfg)
    with torch.device("meta"):
        lazy = Transformer(cfg)
    lazy.to_empty(device="cpu")
    lazy.load_state_dict(model.state_dict())
    x = tokens(cfg, 1, 20)
    with torch.no_grad():
        torch.testing.assert_close(lazy.eval()(x).logits, model(x).logits, atol=0, rtol=0)


def test_dtype_round_trip_keeps_rotary_exact():
    """`.to(bf16)` (DeepSpeed's bf16 mode) must not round the rotary tables for good."""
    cfg = tiny()
    model = build(cfg)
    x = tokens(cfg, 1, 20)
    with torch.no_grad():
        model(x)  # builds the tables
        before = model.state_dict()
        ref = Transformer(cfg).eval()
        model.to(torch.bfloat16).to(torch.float32)
        ref.load_state_dict(model.state_dict())  # same (bf16-rounded) weights, fresh tables
        torch.testing.assert_close(model(x).logits, ref(x).logits, atol=0, rtol=0)
    assert before.keys() == model.state_dict().keys()


# ---------------------------------------------------------------- Hugging Face parity

PARITY = {
    "gqa": dict(**GQA),
    "gqa_tied": dict(**GQA, tie_embeddings=True),
    "mha_tied_theta": dict(**MHA, tie_embeddings=True, rope_theta=500000.0, norm_eps=1e-4),
    "mqa_head_dim": dict(**MQA_ODD_HEAD_DIM),
}


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def hf_model(transformers, cfg: ModelConfig, impl: str, state_dict=None):
    hf = transformers.LlamaForCausalLM(to_llama_config(cfg, attn_implementation=impl))
    assert hf.config._attn_implementation == impl
    if state_dict is not None:
        hf.load_state_dict(state_dict, strict=True)
    return hf.float().eval()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(PARITY))
def test_logits_match_hugging_face_llama(transformers, name, impl):
    cfg = tiny(**PARITY[name])
    ours = build(cfg)
    hf = hf_model(transformers, cfg, impl, to_llama_state_dict(ours, cfg))
    if cfg.tie_embeddings:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
    x = tokens(cfg, 2, 48)
    targets = torch.cat([x[:, 1:], torch.full_like(x[:, :1], IGNORE_INDEX)], dim=1)
    with torch.no_grad():
        a = ours(x, targets)
        b = hf(input_ids=x, labels=x)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-6)


def test_greedy_generation_matches_hugging_face(transformers):
    cfg = tiny(**GQA)
    ours = build(cfg)
    hf = hf_model(transformers, cfg, "sdpa", to_llama_state_dict(ours, cfg))
    prompt = tokens(cfg, 2, 6)
    with torch.no_grad():
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                             min_new_tokens=10, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 10, temperature=0), theirs)


@pytest.mark.parametrize("name", ["gqa", "gqa_tied"])
def test_state_dict_conversion_round_trips_exactly(transformers, name):
    cfg = tiny(**PARITY[name])
    ours = build(cfg)
    sd = ours.state_dict()
    back = from_llama_state_dict(to_llama_state_dict(sd, cfg), cfg)
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k

    # And from a randomly initialised HF model: ours loads it strictly and computes the same logits.
    torch.manual_seed(3)
    hf = hf_model(transformers, cfg, "eager")
    hf_sd = hf.state_dict()
    if cfg.tie_embeddings:  # checkpoints saved with tying may omit lm_head entirely
        hf_sd.pop("lm_head.weight")
    mine = Transformer(cfg).eval()
    mine.load_state_dict(from_llama_state_dict(hf_sd, cfg), strict=True)
    again = to_llama_state_dict(mine, cfg)
    assert again.keys() == hf.state_dict().keys()
    for k, v in hf.state_dict().items():
        assert torch.equal(again[k], v), k
    x = tokens(cfg, 1, 32)
    with torch.no_grad():
        torch.testing.assert_close(mine(x).logits, hf(input_ids=x).logits, atol=1e-5, rtol=1e-5)


def test_conversion_rejects_mismatched_checkpoints():
    cfg = tiny()
    sd = to_llama_state_dict(build(cfg), cfg)
    with pytest.raises(KeyError, match="lm_head"):
        from_llama_state_dict({k: v for k, v in sd.items() if k != "lm_head.weight"}, cfg)
    with pytest.raises(KeyError):
        from_llama_state_dict(sd, tiny(n_layers=1))  # a leftover layer
    with pytest.raises(ValueError, match="differs"):
        from_llama_state_dict(sd, tiny(tie_embeddings=True))


def test_llama_config_fields(transformers):
    cfg = ModelConfig.from_name("2.4b")
    lc = to_llama_config(cfg)
    assert (lc.hidden_size, lc.intermediate_size, lc.num_hidden_layers) == (3200, 3200, 44)
    assert (lc.num_attention_heads, lc.num_key_value_heads, lc.head_dim) == (40, 8, 80)
    assert lc.vocab_size == 60416 and lc.max_position_embeddings == 2048
    assert lc.rms_norm_eps == cfg.norm_eps and lc.tie_word_embeddings is False
    assert lc.rope_parameters["rope_type"] == "default"
    assert lc.rope_parameters["rope_theta"] == cfg.rope_theta
    assert not lc.attention_bias and not lc.mlp_bias and lc.hidden_act == "silu"
