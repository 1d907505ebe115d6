"""Memory attention against a plain loop-over-queries reference; chunk isolation; slot masks."""
from __future__ import annotations

import math

import pytest
import torch

from memory3.model.memory_attention import (ChunkMemories, LayerMemory, chunk_blocks,
                                            compact_slots, memory_attention)

THETA = 10000.0


def rope(x: torch.Tensor, pos: int) -> torch.Tensor:
    """Rotary of one vector x (D,) at integer position pos, written independently."""
    D = x.shape[-1]
    out = torch.empty_like(x)
    for i in range(D // 2):
        a = pos / THETA ** (2 * i / D)
        x1, x2 = x[i], x[i + D // 2]
        out[i], out[i + D // 2] = x1 * math.cos(a) - x2 * math.sin(a), x2 * math.cos(a) + x1 * math.sin(a)
    return out


def naive(q, k, v, mem, layer, slot, q_start, chunk_len, ref_len):
    """Loop over batch, heads and queries; list the keys each query may see."""
    B, H, T, D = q.shape
    G = k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            for t in range(T):
                pos = q_start + t
                chunk = pos // chunk_len
                shift = chunk * chunk_len - ref_len
                c = chunk - mem.first_chunk
                keys, vals = [rope(mem.sink[layer, 0, g], shift)], [mem.sink[layer, 1, g]]
                if slot is not None:
                    for m in range(mem.kv.shape[2]):
                        for s in range(mem.kv.shape[-2]):
                            if mem.valid[b, c, m, s]:
                                # stored keys sit at their reference position; shift composes
                                keys.append(rope(mem.kv[b, c, m, slot, 0, g, s], shift))
                                vals.append(mem.kv[b, c, m, slot, 1, g, s])
                for j in range(pos + 1):
                    keys.append(k[b, g, j])
                    vals.append(v[b, g, j])
                scores = torch.stack(keys) @ q[b, h, t] / math.sqrt(D)
                out[b, h, t] = torch.softmax(scores, 0) @ torch.stack(vals)
    return out


def random_memories(B=2, C=3, M=2, L_mem=2, G=2, K=3, D=8, n_layers=3, first_chunk=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(B, C, M, L_mem, 2, G, K, D, generator=g)
    valid = torch.rand(B, C, M, K, generator=g) > 0.3
    valid[..., 0] = True
    kv = kv * valid[:, :, :, None, None, None, :, None]
    return ChunkMemories(kv=kv, valid=valid, sink=torch.randn(n_layers, 2, G, D, generator=g),
                         first_chunk=first_chunk)


@pytest.mark.parametrize("slot", [None, 1])
@pytest.mark.parametrize("q_start, T, first_chunk", [(0, 12, 0), (5, 7, 1), (11, 1, 2)])
def test_matches_naive_reference(slot, q_start, T, first_chunk):
    chunk_len, ref_len, H, G, D = 4, 6, 4, 2, 8
    n_chunks = (q_start + T - 1) // chunk_len - first_chunk + 1
    mem = random_memories(C=n_chunks, first_chunk=first_chunk)
    g = torch.Generator().manual_seed(1)
    S = q_start + T
    q = torch.randn(2, H, T, D, generator=g)
    k, v = torch.randn(2, G, S, D, generator=g), torch.randn(2, G, S, D, generator=g)
    blocks = chunk_blocks(mem, 1, slot, chunk_len, ref_len, THETA)
    out = memory_attention(q, k, v, LayerMemory(*blocks, q_start, first_chunk, chunk_len))
    torch.testing.assert_close(out, naive(q, k, v, mem, 1, slot, q_start, chunk_len, ref_len),
                               atol=1e-5, rtol=1e-5)


def test_a_chunk_never_sees_another_chunks_memories():
    chunk_len, ref_len = 4, 6
    mem = random_memories(C=3)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 12, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g),
               torch.randn(2, 2, 12, 8, generator=g))
    base = memory_attention(q, k, v, LayerMemory(*chunk_blocks(mem, 0, 0, chunk_len, ref_len, THETA), 0, 0, 4))
    mem.kv[:, 1] += 5.0  # change only chunk 1's memories
    changed = memory_attention(q, k, v, LayerMemory(*chunk_blocks(mem, 0, 0, chunk_len, ref_len, THETA), 0, 0, 4))
    torch.testing.assert_close(changed[:, :, :4], base[:, :, :4])
    torch.testing.assert_close(changed[:, :, 8:], base[:, :, 8:])
    assert not torch.allclose(changed[:, :, 4:8], base[:, :, 4:8])


def test_empty_slots_are_invisible():
    """Garbage in masked slots must not change anything."""
    mem = random_memories(C=3)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 12, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g),
               torch.randn(2, 2, 12, 8, generator=g))
    base = memory_attention(q, k, v, LayerMemory(*chunk_blocks(mem, 0, 1, 4, 6, THETA), 0, 0, 4))
    mem.kv.masked_fill_(~mem.valid[:, :, :, None, None, None, :, None], 1e4)
    torch.testing.assert_close(
        memory_attention(q, k, v, LayerMemory(*chunk_blocks(mem, 0, 1, 4, 6, THETA), 0, 0, 4)), base)


def test_compact_slots_moves_empty_slots_last():
    g = torch.Generator().manual_seed(4)
    kv = torch.randn(5, 2, 2, 3, 4, 8, generator=g)         # (N, L_mem, 2, G, K, D)
    positions = torch.randint(1, 100, (5, 2, 3, 4), generator=g)
    positions[1, :, :, 0] = 0                                  # one empty slot per head, first
    positions[2, :, 0, 1:] = 0                                 # three empty, all heads alike below
    positions[2, :, 1:, :3] = 0
    kv_c, valid = compact_slots(kv, positions)
    assert valid.tolist()[1] == [True, True, True, False]
    assert valid.tolist()[2] == [True, False, False, False]
    torch.testing.assert_close(kv_c[1, :, :, :, :3], kv[1, :, :, :, 1:])
    torch.testing.assert_close(kv_c[2, :, :, 0, 0], kv[2, :, :, 0, 0])
    torch.testing.assert_close(kv_c[2, :, :, 1:, 0], kv[2, :, :, 1:, 3])
    assert (kv_c[1, :, :, :, 3] == 0).all()
    positions[3, 0, 0, 0] = 0                                  # one head keeps fewer tokens
    with pytest.raises(ValueError, match="different numbers of tokens"):
        compact_slots(kv, positions)


# ------------------------------------------------------------------ through the whole model

from memory3.config import ModelConfig  # noqa: E402
from memory3.model import Transformer  # noqa: E402


def model_and_memories(n_chunks=3, M=2, sink=True, seed=0):
    cfg = ModelConfig.from_name("tiny", n_layers=3, memory_layers=[0, 2], chunk_len=8,
                                reference_len=16, memory_top_k=4, memories_per_chunk=M)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    L_mem, G, K, D = 2, cfg.n_kv_heads, cfg.memory_top_k, cfg.head_dim
    kv = torch.randn(2, n_chunks, M, L_mem, 2, G, K, D, generator=g)
    valid = torch.ones(2, n_chunks, M, K, dtype=torch.bool)
    valid[:, :, 1, 2:] = False
    kv = kv * valid[:, :, :, None, None, None, :, None]
    sink_kv = torch.randn(cfg.n_layers, 2, G, D, generator=g) if sink else None
    return model, ChunkMemories(kv=kv, valid=valid, sink=sink_kv)


@torch.no_grad()
def test_model_with_empty_memories_equals_plain_model():
    model, mem = model_and_memories(sink=False)
    mem.valid[:] = False
    mem.kv.normal_()  # garbage in masked slots
    x = torch.randint(0, 512, (2, 24))
    torch.testing.assert_close(model(x, memory=mem).logits, model(x).logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_model_memories_only_reach_their_chunk():
    model, mem = model_and_memories()
    x = torch.randint(0, 512, (2, 24))
    base = model(x, memory=mem).logits
    assert not torch.allclose(base, model(x).logits)  # memories are read
    mem.kv[:, 1] *= 3.0
    out = model(x, memory=mem).logits
    torch.testing.assert_close(out[:, :8], base[:, :8])  # chunk 0 unaffected by chunk 1's memories
    assert not torch.allclose(out[:, 8:16], base[:, 8:16])


@torch.no_grad()
def test_kv_cache_decoding_with_memories_matches_full_forward():
    model, mem = model_and_memories()
    x = torch.randint(0, 512, (2, 24))
    full = model(x, memory=mem).logits
    cache = model.new_cache(2, 24)
    steps = [model(x[:, :11], cache=cache, memory=ChunkMemories(mem.kv[:, :2], mem.valid[:, :2],
                                                                 mem.sink)).logits]
    for t in range(11, 24):
        c = t // 8
        chunk_mem = ChunkMemories(mem.kv[:, c:c + 1], mem.valid[:, c:c + 1], mem.sink, first_chunk=c)
        steps.append(model(x[:, t:t + 1], cache=cache, memory=chunk_mem).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_memories_must_cover_the_queries():
    model, mem = model_and_memories(n_chunks=2)
    with pytest.raises(ValueError, match="memories cover chunks 0..1"):
        model(torch.randint(0, 512, (2, 24)), memory=mem)


def decode_stepwise(model, x, mem, cache, prefill: int, per_chunk: bool = True):
    """Logits of x fed as one prefill then token by token, each step reading its chunk's
    memories (a one-chunk ChunkMemories, as generation makes them, or all of mem)."""
    L = model.cfg.chunk_len
    C = -(-prefill // L)
    steps = [model(x[:, :prefill], cache=cache, memory=ChunkMemories(
        mem.kv[:, :C], mem.valid[:, :C], mem.sink)).logits]
    for t in range(prefill, x.shape[1]):
        c = t // L
        chunk_mem = (ChunkMemories(mem.kv[:, c:c + 1], mem.valid[:, c:c + 1], mem.sink,
                                   first_chunk=c) if per_chunk else mem)
        steps.append(model(x[:, t:t + 1], cache=cache, memory=chunk_mem).logits)
    return torch.cat(steps, dim=1)


@torch.no_grad()
@pytest.mark.parametrize("prefill", [5, 11])  # within chunk 0 (held block, T > 1) / across two
@pytest.mark.parametrize("per_chunk", [True, False])
def test_held_memory_blocks_match_full_forward_with_uneven_rows(prefill, per_chunk):
    """Decoding keeps the chunk's block in cache slots; rows holding different numbers of valid
    slots (row 1 has empty ones, row 0 none in chunk 2) must still see exactly their own."""
    model, mem = model_and_memories()
    mem.valid[0, 2] = True
    mem.valid[1, 1, 0, 1:] = False
    mem.kv.mul_(mem.valid[:, :, :, None, None, None, :, None])
    x = torch.randint(0, 512, (2, 24))
    full = model(x, memory=mem).logits
    cache = model.new_cache(2, 24)
    assert cache.memory_slots == 1 + 2 * 4
    out = decode_stepwise(model, x, mem, cache, prefill, per_chunk)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    assert cache.reading and cache.held[0] == 9 and cache.held[1] == 1  # layer 1: sink only


@torch.no_grad()
def test_decoding_without_memory_slots_concatenates_and_agrees():
    model, mem = model_and_memories()
    x = torch.randint(0, 512, (2, 24))
    out = decode_stepwise(model, x, mem, model.new_cache(2, 24, memory_slots=0), 11)
    torch.testing.assert_close(out, model(x, memory=mem).logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_held_block_follows_in_place_edits_and_plain_steps():
    model, mem = model_and_memories()
    x = torch.randint(0, 512, (2, 24))
    original = lambda: ChunkMemories(mem.kv.clone(), mem.valid, mem.sink)  # noqa: E731
    edited = original()
    edited.kv[:, 2] *= 3.0
    caches = {"in place": model.new_cache(2, 24), "new object": model.new_cache(2, 24),
              "slotless": model.new_cache(2, 24, memory_slots=0)}
    steps = {}
    for name, cache in caches.items():
        before = original()
        model(x[:, :17], cache=cache, memory=before)
        model(x[:, 17:18], cache=cache, memory=before)   # chunk 2's block is held now
        if name == "in place":
            before.kv[:, 2] *= 3.0                        # ...and stale unless re-read
        steps[name] = model(x[:, 18:19], cache=cache, memory=before if name == "in place"
                            else edited).logits
    torch.testing.assert_close(steps["in place"], steps["new object"])
    torch.testing.assert_close(steps["in place"], steps["slotless"], atol=1e-5, rtol=1e-5)
    # a step without memory ignores the held block: as a cache that never held one
    plain = [model(x[:, 19:20], cache=c).logits for c in caches.values()]
    torch.testing.assert_close(plain[0], plain[2], atol=1e-5, rtol=1e-5)
    assert not caches["in place"].reading
