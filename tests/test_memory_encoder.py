"""Memory encoder and references: sparse selection against a slow plain implementation, rotary
positions of kept keys, BOS/padding never kept, padding invariance, depth, gradients; splitting
documents into references, packing, reading a knowledge base."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from memory3.config import ModelConfig
from memory3.data import DataError, Document, ReadStats, Tokenizer, train_tokenizer
from memory3.memory.encoder import EncodedMemories, MemoryEncoder, attention_received
from memory3.memory.references import (Reference, iter_references, pack_references,
                                       split_document)
from memory3.model import Transformer
from memory3.model.layers import apply_rotary

REF_BOS, PAD = 4, 0
TOP_K = 8


def build(seed: int = 0, **overrides) -> Transformer:
    # init_std 0.1 makes attention peaky, so scores are far apart and rankings are not decided by
    # rounding noise (at the default 0.02 every token receives almost the same attention).
    cfg = ModelConfig.from_name("tiny", **{"n_layers": 4, "memory_layers": [0, 1],
                                           "init_std": 0.1, **overrides})
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def random_refs(lengths: list[int], vocab: int, seed: int = 1) -> list[list[int]]:
    """Token lists (no BOS) of the given lengths, avoiding the special ids 0-4."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]


def pack(refs) -> tuple[torch.Tensor, torch.Tensor]:
    return pack_references(refs, ref_bos_id=REF_BOS, pad_id=PAD, reference_len=128)


# ---------------------------------------------------------------- slow, obvious reference

def rotate64(x: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    """Rotary of one vector (D,) in float64: the pairs (i, i + D/2) as complex numbers."""
    D = x.shape[-1]
    freqs = theta ** (-torch.arange(0, D // 2, dtype=torch.float64) * 2 / D)
    z = torch.complex(x[:D // 2], x[D // 2:]) * torch.polar(torch.ones(D // 2, dtype=torch.float64),
                                                           position * freqs)
    return torch.cat([z.real, z.imag])


def attention_inputs(model: Transformer, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
    """The input of every layer's attention (after attn_norm), (N, L, d_model) float64, captured
    from the model's own ordinary forward of the batch."""
    captured = {}
    hooks = [block.attn.register_forward_pre_hook(
        lambda mod, args, i=i: captured.__setitem__(i, args[0].double()))
        for i, block in enumerate(model.blocks)]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return captured


@torch.no_grad()
def slow_memory(model: Transformer, inputs: dict[int, torch.Tensor],
                n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One reference encoded the plain way from its attention inputs (n, d_model) per layer (its n
    real positions, BOS included): positions (L_mem, G, K), kv (L_mem, 2, G, K, D)."""
    cfg = model.cfg
    H, G, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    layers = cfg.memory_layer_ids
    positions = torch.zeros(len(layers), G, TOP_K, dtype=torch.long)
    kv = torch.zeros(len(layers), 2, G, TOP_K, D, dtype=torch.float64)
    for li, layer in enumerate(layers):
        wq, wk, wv = model.blocks[layer].attn.wqkv.weight.double().split((H * D, G * D, G * D))
        x = inputs[layer]
        q, k, v = (x @ wq.T).view(n, H, D), (x @ wk.T).view(n, G, D), (x @ wv.T).view(n, G, D)
        for g in range(G):
            received = [0.0] * n
            for h in range(g * (H // G), (g + 1) * (H // G)):
                for i in range(n):
                    logits = [float(q[i, h] @ k[j, g]) / math.sqrt(D) for j in range(n)]
                    top = max(logits)
                    weights = [math.exp(s - top) for s in logits]
                    for j in range(n):
                        received[j] += weights[j] / sum(weights)
            best = sorted(range(1, n), key=lambda j: (-received[j], j))[:TOP_K]
            for slot, j in enumerate(sorted(best)):
                positions[li, g, slot] = j
                kv[li, 0, g, slot] = rotate64(k[j, g], j, cfg.rope_theta)
                kv[li, 1, g, slot] = v[j, g]
    return positions, kv


# ---------------------------------------------------------------- selection

@pytest.mark.parametrize("memory_layers,shift", [([0, 1], False), ([1, 3], False), ([0, 1], True)],
                         ids=["first", "skip-layer-0", "token-shift"])
def test_selection_equals_slow_reference(memory_layers, shift):
    model = build(memory_layers=memory_layers, token_shift=shift)
    if shift:  # memories are selected from, and keep, what the model's own forward computes
        with torch.no_grad():
            model.shift.normal_(0, 1)
    refs = random_refs([30, 3, 12, 17], model.cfg.vocab_size)
    tokens, lengths = pack(refs)
    mem = MemoryEncoder(model).encode(tokens, lengths)
    assert mem.kv.shape == (4, 2, 2, 2, TOP_K, 16) and mem.positions.shape == (4, 2, 2, TOP_K)
    # Padding is hidden from real tokens by causality, so each reference's real rows of the
    # batch's forward are its own; encoding alone vs batched is checked in test_padding_invariance.
    inputs = attention_inputs(model, tokens)
    for n, length in enumerate(lengths.tolist()):
        positions, kv = slow_memory(model, {i: x[n, :length] for i, x in inputs.items()}, length)
        assert torch.equal(mem.positions[n], positions), n
        torch.testing.assert_close(mem.kv[n].double(), kv, atol=1e-6, rtol=0)


def test_kept_keys_carry_their_original_rotary_positions():
    model = build()
    refs = random_refs([40, 25], model.cfg.vocab_size)
    tokens, lengths = pack(refs)
    # The model's own rotated keys and unrotated projections, from an ordinary forward.
    rotated, unrotated = {}, {}
    for i, block in enumerate(model.blocks):
        project = block.attn.project_qkv

        def capture(x, cos, sin, i=i, project=project):
            q, k, v = project(x, cos, sin)
            rotated[i] = k
            return q, k, v
        block.attn.project_qkv = capture
        block.attn.wqkv.register_forward_hook(
            lambda mod, args, out, i=i: unrotated.__setitem__(i, out))
    with torch.no_grad():
        model(tokens)
    mem = MemoryEncoder(model).encode(tokens, lengths)
    cos, sin = model.rotary(0, tokens.shape[1], tokens.device, torch.float32)
    G, D = model.cfg.n_kv_heads, model.cfg.head_dim
    for li, layer in enumerate(model.cfg.memory_layer_ids):
        k_plain = unrotated[layer][..., model.cfg.n_heads * D:][..., :G * D]
        k_plain = k_plain.view(*tokens.shape, G, D).transpose(1, 2)             # (N, G, L, D)
        for n in range(len(refs)):
            for g in range(G):
                for slot, p in enumerate(mem.positions[n, li, g].tolist()):
                    stored = mem.kv[n, li, 0, g, slot]
                    torch.testing.assert_close(stored, rotated[layer][n, g, p], atol=1e-6, rtol=0)
                    back = apply_rotary(stored, cos[p], -sin[p])  # the inverse rotation
                    torch.testing.assert_close(back, k_plain[n, g, p], atol=1e-6, rtol=0)


def adversarial_model() -> Transformer:
    """Layer 0 built so that the reference-BOS and padding keys would take nearly all attention
    if they were not excluded: their embedding is the direction e0, which layer 0 turns into a key
    aligned with every query; real tokens have no e0 component, so they all tie."""
    model = build(memory_layers=[0], n_layers=2)
    cfg = model.cfg
    H, G, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    with torch.no_grad():
        emb = model.embed.weight
        emb.normal_(0, 1)
        emb[:, 0] = 0
        emb[:, 1] = 1          # every token feeds the queries through e1
        emb[[PAD, REF_BOS]] = 0
        emb[[PAD, REF_BOS], 0] = 1
        emb[[PAD, REF_BOS], 1] = 1
        w = model.blocks[0].attn.wqkv.weight
        w[:(H + G) * D] = 0
        for h in range(H):
            w[h * D, 1] = 3.0             # q_h = 3 * x[1] * u
        for g in range(G):
            w[(H + g) * D, 0] = 3.0       # k_g = 3 * x[0] * u
    return model


def test_bos_and_padding_never_kept_even_when_they_draw_all_attention():
    model = adversarial_model()
    refs = random_refs([40, 20, 5], model.cfg.vocab_size)
    tokens, lengths = pack(refs)
    # The construction works: scored without masks, BOS or padding would win everywhere.
    attn = model.blocks[0].attn
    H, G, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    with torch.no_grad():
        x = model.blocks[0].attn_norm(model.embed(tokens))
        q, k, _ = x.matmul(attn.wqkv.weight.T).split(attn.split_sizes, dim=-1)
        q = q.view(*tokens.shape, H, D)[..., ::H // G, :]  # one query head per group suffices
        k = k.view(*tokens.shape, G, D)
        unmasked = torch.einsum("nigd,njgd->nijg", q, k).div(D ** 0.5).softmax(2).sum(1)
    winner = unmasked.argmax(1)                                                 # (N, G)
    assert ((winner == 0) | (winner >= lengths[:, None])).all()

    mem = MemoryEncoder(model).encode(tokens, lengths)
    for n, length in enumerate(lengths.tolist()):
        kept = min(TOP_K, length - 1)
        # All real tokens tie, so the lowest positions are kept, then empty slots.
        expected = torch.tensor(list(range(1, kept + 1)) + [0] * (TOP_K - kept))
        assert torch.equal(mem.positions[n, 0], expected.expand(G, -1)), n
    assert torch.isfinite(mem.kv).all()


def test_equal_keys_tie_exactly_whatever_the_batch():
    """A token repeated in a reference has one key at the first layer (its input is the embedding):
    its copies must receive the same attention to the bit, at every padded length, so that ties go
    to the lower position and a reference's memory does not depend on its batch (multi-rank builds
    batch references differently). A vector-matrix bmm over the queries broke such ties."""
    model = build(memory_layers=[0], n_layers=2)
    vocab = model.cfg.vocab_size
    g = torch.Generator().manual_seed(3)
    words = torch.randint(5, vocab, (5,), generator=g)
    ref = words[torch.randint(0, 5, (60,), generator=g)].tolist()
    encoder = MemoryEncoder(model)
    alone = encoder.encode(*pack([ref])).positions[0, 0]                   # (G, K)
    for g_kept in alone.tolist():  # the copies of a word that are kept are its first ones
        for word in words.tolist():
            copies = [i + 1 for i, t in enumerate(ref) if t == word]
            kept = [p for p in g_kept if p in copies]
            assert kept == copies[:len(kept)], (word, copies, g_kept)
    attn = model.blocks[0].attn
    H, G, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    for other_len in range(61, 128, 2):  # padded lengths 62..128 (60 tokens + BOS alone: 61)
        tokens, lengths = pack([random_refs([other_len], vocab, seed=other_len)[0], ref])
        with torch.no_grad():
            x = model.blocks[0].attn_norm(model.embed(tokens))
            q, k, _ = x.matmul(attn.wqkv.weight.T).split(attn.split_sizes, dim=-1)
            received = attention_received(q.view(*tokens.shape, H, D).transpose(1, 2),
                                          k.view(*tokens.shape, G, D).transpose(1, 2), lengths)
        for word in words.tolist():
            at = (tokens[1] == word).nonzero()[:, 0]
            assert len(at) > 1
            same = received[1][:, at]
            assert torch.equal(same, same[:, :1].expand_as(same)), (other_len, word)
        assert torch.equal(encoder.encode(tokens, lengths).positions[1, 0], alone), other_len


def test_short_references_have_empty_slots():
    model = build()
    refs = random_refs([1, 3, 8], model.cfg.vocab_size)  # L = 9: every reference is short
    mem = MemoryEncoder(model).encode(*pack(refs))
    for n, ref in enumerate(refs):
        kept = len(ref)
        assert (mem.positions[n, ..., :kept] > 0).all()
        assert (mem.positions[n, ..., kept:] == 0).all()
        assert torch.equal(mem.positions[n, ..., :kept],
                           torch.arange(1, kept + 1).expand(2, 2, -1))  # all kept, ascending
        assert (mem.kv[n, ..., kept:, :] == 0).all()
        assert (mem.kv[n, ..., :kept, :] != 0).any(-1).all()
        assert mem.mask[n].sum() == 2 * 2 * kept
    # Shorter than K overall (L = 4 < K = 8) goes through the same path.
    tiny_batch = MemoryEncoder(model).encode(*pack(random_refs([1, 3], model.cfg.vocab_size)))
    assert tiny_batch.positions.shape[-1] == TOP_K
    assert torch.equal(tiny_batch.mask.sum((1, 2, 3)), torch.tensor([4, 12]))


def test_padding_invariance():
    model = build()
    refs = random_refs([6, 13, 90, 127], model.cfg.vocab_size)
    encoder = MemoryEncoder(model)
    batch = encoder.encode(*pack(refs))
    assert torch.isfinite(batch.kv).all()
    for n in (0, 1, 2):
        alone = encoder.encode(*pack([refs[n]]))
        assert torch.equal(batch.positions[n], alone.positions[0])
        # Equal up to fp32 rounding: matmuls of other shapes sum in another order.
        torch.testing.assert_close(batch.kv[n], alone.kv[0], atol=1e-6, rtol=1e-5)


def test_runs_only_up_to_the_deepest_memory_layer():
    model = build(memory_layers=[0, 1])  # 4 layers
    called: set[str] = set()
    for name, module in model.named_modules():
        if name:
            module.register_forward_hook(lambda m, a, o, name=name: called.add(name))
    MemoryEncoder(model).encode(*pack(random_refs([10, 20], model.cfg.vocab_size)))
    assert {"embed", "blocks.0.attn.wqkv", "blocks.0.mlp", "blocks.1.attn.wqkv"} <= called
    deeper = {n for n in called if n.startswith(("blocks.2", "blocks.3", "norm", "lm_head"))}
    assert not deeper
    # The deepest memory layer's attention output and MLP are not needed either.
    assert not {n for n in called if n.startswith(("blocks.1.attn.wo", "blocks.1.mlp"))}


def test_gradients_flow_only_when_asked():
    model = build()
    tokens, lengths = pack(random_refs([20, 9], model.cfg.vocab_size))
    encoder = MemoryEncoder(model)
    frozen = encoder.encode(tokens, lengths)
    assert not frozen.kv.requires_grad and frozen.kv.grad_fn is None
    live = encoder.encode(tokens, lengths, grad="full")
    assert live.kv.requires_grad
    live.kv.square().sum().backward()
    for name in ("embed.weight", "blocks.0.attn.wqkv.weight", "blocks.0.mlp.w_down.weight",
                 "blocks.1.attn.wqkv.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    torch.testing.assert_close(live.kv.detach(), frozen.kv, atol=0, rtol=0)
    with pytest.raises(ValueError, match="grad must be one of"):
        encoder.encode(tokens, lengths, grad=True)


def test_kv_gradient_reaches_only_the_memory_layers_projections():
    """grad="kv": same memories bit for bit; the gradient of the kept keys/values (through
    their projections only) equals the full gradient's part that flows through those
    projections, i.e. the full gradient with the block inputs held fixed."""
    model = build()
    tokens, lengths = pack(random_refs([20, 9, 14], model.cfg.vocab_size))
    encoder = MemoryEncoder(model)
    kv = encoder.encode(tokens, lengths, grad="kv")
    torch.testing.assert_close(kv.kv.detach(), encoder.encode(tokens, lengths).kv, atol=0, rtol=0)
    weights = torch.randn_like(kv.kv)
    (kv.kv * weights).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    wanted = {f"blocks.{i}.{n}" for i in model.cfg.memory_layer_ids
              for n in ("attn.wqkv.weight", "attn_norm.weight")}
    assert set(got) == wanted and all(g.abs().sum() > 0 for g in got.values())

    # Reference: the plain projections of each memory layer's (detached) block input, gathered.
    model.zero_grad()
    cos, sin = model.rotary(0, tokens.shape[1], tokens.device, torch.float32)
    with torch.no_grad():
        inputs = {i: x for i, x, *_ in encoder._attention_inputs(tokens, encoder.layer_ids, cos, sin)}
    total = 0
    for j, i in enumerate(encoder.layer_ids):
        block = model.blocks[i]
        _, k, v = block.attn.wqkv(block.attn_norm(inputs[i])).split(block.attn.split_sizes, -1)
        G, D = block.attn.n_kv_heads, block.attn.head_dim
        k = apply_rotary(k.view(*k.shape[:2], G, D).transpose(1, 2), cos, sin)
        v = v.view(*v.shape[:2], G, D).transpose(1, 2)
        pos = kv.positions[:, j]
        for t, w in ((k, weights[:, j, 0]), (v, weights[:, j, 1])):
            kept = t.gather(2, pos[..., None].expand(-1, -1, -1, D))
            total = total + (kept * w * (pos > 0)[..., None]).sum()
    total.backward()
    for name in wanted:
        torch.testing.assert_close(got[name], model.get_parameter(name).grad)


def test_sink_kv_is_the_reference_bos_alone_at_every_layer():
    model = build(memory_layers=[1])
    sink = MemoryEncoder(model).sink_kv()
    assert sink.shape == (4, 2, 2, 16) and not sink.requires_grad
    kv = {}
    for i, block in enumerate(model.blocks):
        project = block.attn.project_qkv

        def capture(x, cos, sin, i=i, project=project):
            q, k, v = project(x, cos, sin)
            kv[i] = torch.stack([k[:, :, 0], v[:, :, 0]], dim=1)  # position 0: (N, 2, G, D)
            return q, k, v
        block.attn.project_qkv = capture
    tokens, _ = pack(random_refs([30, 7], model.cfg.vocab_size))
    with torch.no_grad():
        model(tokens)  # causal: position 0 sees only the reference-BOS, whatever follows
    for i in range(4):
        for n in range(2):
            torch.testing.assert_close(sink[i], kv[i][n], atol=1e-6, rtol=0)


def test_bf16_model_encodes_with_valid_positions():
    model = build().to(torch.bfloat16)
    refs = random_refs([40, 5], model.cfg.vocab_size)
    tokens, lengths = pack(refs)
    mem = MemoryEncoder(model).encode(tokens, lengths)
    assert mem.kv.dtype == torch.bfloat16 and torch.isfinite(mem.kv.float()).all()
    assert ((mem.positions >= 0) & (mem.positions < lengths[:, None, None, None])).all()
    assert torch.equal(mem.mask.sum((1, 2, 3)), torch.tensor([2 * 2 * TOP_K, 2 * 2 * 5]))


def test_encoded_memories_indexing_and_to():
    model = build()
    mem = MemoryEncoder(model).encode(*pack(random_refs([9, 3, 14], model.cfg.vocab_size)))
    assert len(mem) == 3
    one = mem[1]
    assert isinstance(one, EncodedMemories) and one.kv.shape[0] == 1
    assert torch.equal(one.positions[0], mem.positions[1])
    assert torch.equal(mem[-1].kv[0], mem.kv[2])
    assert torch.equal(mem[1:].positions, mem.positions[1:])
    assert torch.equal(mem[torch.tensor([2, 0])].positions, mem.positions[[2, 0]])
    half = mem.to(dtype=torch.bfloat16)
    assert half.kv.dtype == torch.bfloat16 and half.positions.dtype == torch.long
    assert torch.equal(half.mask, mem.mask)


def test_encode_rejects_bad_input():
    encoder = MemoryEncoder(build())
    tokens, lengths = pack([[5, 6, 7]])
    with pytest.raises(ValueError, match="lengths"):
        encoder.encode(tokens, torch.tensor([5]))
    with pytest.raises(ValueError, match="lengths"):
        encoder.encode(tokens, torch.tensor([0]))
    with pytest.raises(ValueError, match="expected tokens"):
        encoder.encode(tokens[0], lengths)
    with pytest.raises(ValueError, match="no memory layers"):
        MemoryEncoder(build(memory_layers="none"))


# ---------------------------------------------------------------- references

WORDS = ("the a of memory model token river city ship north quiet green seven 1984 café 東京 "
         "reads writes holds").split()


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + "."


def paragraph(rng: random.Random, n_sentences: int) -> str:
    return " ".join(sentence(rng) for _ in range(n_sentences))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("kb_tok")
    (folder / "train.txt").write_text("\n\n".join(paragraph(rng, 5) for _ in range(300)))
    return train_tokenizer([folder], folder / "tok", 320, progress=False)


def test_split_document_covers_the_document(tokenizer):
    text = paragraph(random.Random(1), 120)
    doc = Document(text, "kb/a.txt", 3)
    ids = tokenizer.encode(text)
    assert len(ids) > 1000
    for reference_len in (128, 16):
        refs = split_document(doc, ids, reference_len, tokenizer=tokenizer)
        assert [t for r in refs for t in r.tokens] == ids
        assert refs[0].start == 0 and refs[-1].end == len(ids)
        assert all(a.end == b.start for a, b in zip(refs, refs[1:]))
        assert all(1 <= len(r.tokens) == r.end - r.start <= reference_len - 1 for r in refs)
        assert all(r.doc_id == "kb/a.txt#3" and r.text == tokenizer.decode(r.tokens) for r in refs)
        keys = [r.key for r in refs]
        assert len(set(keys)) == len(keys) and all(len(k) == 40 for k in keys)
        assert [r.key for r in split_document(doc, ids, reference_len, tokenizer=tokenizer)] == keys
    # Windows end at a sentence end when one lies in their last quarter, else they are full.
    refs = split_document(doc, ids, 128, tokenizer=tokenizer)
    assert "".join(r.text for r in refs) == text
    for r, after in zip(refs, refs[1:]):
        if not (r.text.endswith(".") and after.text[:1].isspace()):
            assert len(r.tokens) == 127
            for end in range(r.start + 127 - 31, r.end):
                assert not (tokenizer.decode(ids[r.start:end]).endswith(".")
                            and tokenizer.decode(ids[end:end + 1]).startswith(" ")), end
    # Short sentences: always one in the last quarter, so every window but the last ends on one.
    rng = random.Random(5)
    text = " ".join(rng.choice(["Green river.", "A ship reads.", "Quiet city holds of."])
                    for _ in range(300))
    ids = tokenizer.encode(text)
    refs = split_document(Document(text, "b.txt", 0), ids, 128, tokenizer=tokenizer)
    assert len(refs) > 10 and "".join(r.text for r in refs) == text
    assert all(r.text.endswith(".") and b.text.startswith(" ") for r, b in zip(refs, refs[1:]))
    assert all(len(r.tokens) >= 127 - 31 for r in refs[:-1])


def test_split_document_without_sentence_ends_cuts_full_windows(tokenizer):
    text = " ".join(random.Random(2).choice(WORDS) for _ in range(400))
    ids = tokenizer.encode(text)
    refs = split_document(Document(text, "x.txt", 0), ids, 128, tokenizer=tokenizer)
    assert [len(r.tokens) for r in refs[:-1]] == [127] * (len(refs) - 1)
    assert 1 <= len(refs[-1].tokens) <= 127
    # Newlines end sentences too.
    lines = "\n".join(" ".join(["green river"] * 10) for _ in range(30))
    ids = tokenizer.encode(lines)
    refs = split_document(Document(lines, "y.txt", 0), ids, 128, tokenizer=tokenizer)
    assert all(r.text.endswith("\n") for r in refs[:-1])


def test_reference_keys_depend_on_document_offset_and_tokens(tokenizer):
    ids = tokenizer.encode("Green river. Quiet city.")
    a = split_document(Document("", "a.txt", 0), ids, tokenizer=tokenizer)[0]
    assert a.key == split_document(Document("", "a.txt", 0), ids, tokenizer=tokenizer)[0].key
    assert a.key != split_document(Document("", "a.txt", 1), ids, tokenizer=tokenizer)[0].key
    assert a.key != split_document(Document("", "b.txt", 0), ids, tokenizer=tokenizer)[0].key
    assert a.key != split_document(Document("", "a.txt", 0), ids[:-1], tokenizer=tokenizer)[0].key
    assert split_document(Document("", "a.txt", 0), [], tokenizer=tokenizer) == []


def test_pack_references():
    refs = [Reference("k", "d#0", 0, 3, (7, 8, 9), "x"), [5], (6, 6, 6, 6, 6)]
    tokens, lengths = pack_references(refs, ref_bos_id=REF_BOS, pad_id=PAD, reference_len=8)
    assert torch.equal(lengths, torch.tensor([4, 2, 6]))
    assert torch.equal(tokens, torch.tensor([[4, 7, 8, 9, 0, 0],
                                             [4, 5, 0, 0, 0, 0],
                                             [4, 6, 6, 6, 6, 6]]))
    assert tokens.dtype == lengths.dtype == torch.long
    tokens, _ = pack_references([[5] * 7], ref_bos_id=REF_BOS, pad_id=PAD, reference_len=8)
    assert tokens.shape == (1, 8)
    with pytest.raises(ValueError, match="1..7"):
        pack_references([[5] * 8], ref_bos_id=REF_BOS, pad_id=PAD, reference_len=8)
    with pytest.raises(ValueError, match="1..7"):
        pack_references([[]], ref_bos_id=REF_BOS, pad_id=PAD, reference_len=8)
    with pytest.raises(ValueError, match="no references"):
        pack_references([], ref_bos_id=REF_BOS, pad_id=PAD, reference_len=8)


def test_iter_references_reads_a_knowledge_base(tokenizer, tmp_path):
    rng = random.Random(3)
    kb = tmp_path / "kb"
    (kb / "sub").mkdir(parents=True)
    paragraphs = [paragraph(rng, rng.randint(1, 40)) for _ in range(7)]
    (kb / "a.txt").write_text("\n\n".join(paragraphs[:4]))
    with open(kb / "sub" / "b.jsonl", "w") as f:
        for text in paragraphs[4:]:
            f.write(json.dumps({"body": text}) + "\n")
        f.write("not json\n")
    stats = ReadStats()
    refs = list(iter_references([kb], tokenizer, 64, text_field="body", stats=stats, batch_size=2))
    assert stats.documents == 7 and stats.bad_json_lines == 1
    assert len(refs) > 7 and all(len(r.tokens) <= 63 for r in refs)
    by_doc: dict[str, list[int]] = {}
    for r in refs:
        by_doc.setdefault(r.doc_id, []).extend(r.tokens)
    sources = [f"{kb / 'a.txt'}#{i}" for i in range(4)] + [f"{kb / 'sub' / 'b.jsonl'}#{i}"
                                                           for i in range(3)]
    assert list(by_doc) == sources
    assert [by_doc[s] for s in sources] == [tokenizer.encode(p) for p in paragraphs]
    again = list(iter_references([kb], tokenizer, 64, text_field="body", batch_size=256))
    assert again == refs  # batching does not change the references

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(DataError, match="no documents"):
        list(iter_references([tmp_path / "empty"], tokenizer))


def test_references_encode_end_to_end(tokenizer, tmp_path):
    (tmp_path / "kb.txt").write_text(paragraph(random.Random(4), 30))
    refs = list(iter_references([tmp_path / "kb.txt"], tokenizer))
    model = build(vocab_size=tokenizer.vocab_size)
    tokens, lengths = pack_references(refs, ref_bos_id=tokenizer.ref_bos_id,
                                      pad_id=tokenizer.pad_id, reference_len=128)
    mem = MemoryEncoder(model).encode(tokens, lengths)
    assert mem.kv.shape[:2] == (len(refs), 2)
    kept = torch.tensor([min(TOP_K, len(r.tokens)) for r in refs])
    assert torch.equal(mem.mask.sum((1, 2, 3)), 2 * 2 * kept)
