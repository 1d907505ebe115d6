"""Memory attention: the context reads retrieved memories inside its own softmax (SPEC 1).

In every layer a query sees [its chunk's block] + [the causal context]. A chunk's block is the
reference-BOS key/value (an attention sink) followed, in memory layers only, by the M*K kept tokens
of the M memories retrieved for that chunk. Blocks of other chunks are masked out, so a chunk never
sees another chunk's memories.

Positions (SPEC 1b, our decision): stored memory keys carry the rotary positions 0..R-1 they had in
their reference (R = reference_len). At read time the block of the chunk starting at position s is
rotated by s - R, which places the reference just before its chunk, as if its text had been put in
front of it. Rotations compose, so this costs one rotation of the block's keys; every chunk then
sees its memories at the same relative distances, identically in training, evaluation and
generation, whatever the chunk's absolute position.

Shapes: B batch, C chunks, M memories per chunk, K kept tokens per memory, G KV heads, H query
heads, D head dim, T queries, S context keys, Sm = 1 + M*K slots per chunk block.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from memory3.config import ModelConfig


@dataclass
class ChunkMemories:
    """The memories read by a run of consecutive chunks of the input.

    kv:     (B, C, M, L_mem, 2, G, K, D) memories as stored: keys rotated at reference positions.
    valid:  (B, C, M, K) bool, True where a slot holds a kept token. The same for every memory
            layer and head (`compact_slots` makes it so), which keeps the mask one per batch row.
    sink:   (n_layers, 2, G, D) key/value of the reference-BOS token at position 0, or None for
            no sink (then a layer that reads no memory is plain attention).
    first_chunk: index in the sequence of chunk 0 of kv; chunk c covers positions
            [(first_chunk + c) * chunk_len, (first_chunk + c + 1) * chunk_len).
    """
    kv: torch.Tensor
    valid: torch.Tensor
    sink: torch.Tensor | None
    first_chunk: int = 0
    # Per-layer blocks, kept when no gradient is recorded: decoding reuses one chunk's memories
    # for up to chunk_len steps and should rotate them once, not once per token.
    _blocks: dict = field(default_factory=dict, repr=False, compare=False)


def compact_slots(kv: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move empty slots (position 0) to the end of each (layer, head) and zero them.

    kv (..., L_mem, 2, G, K, D), positions (..., L_mem, G, K) -> kv, valid (..., K).
    A reference with n < K selectable tokens has n kept tokens in every layer and head, so after
    compaction the empty slots are the same for all of them and one mask per memory suffices.
    """
    valid = positions > 0
    order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)  # valid slots first
    valid = torch.gather(valid, -1, order)
    idx = order[..., None].unsqueeze(-4).expand(*kv.shape[:-4], 2, *order.shape[-2:], kv.shape[-1])
    kv = torch.gather(kv, -2, idx) * valid[..., None].unsqueeze(-4).to(kv.dtype)
    slot_valid = valid[..., 0, 0, :]
    if not torch.equal(valid, slot_valid[..., None, None, :].expand_as(valid)):
        raise ValueError("memories keep different numbers of tokens in different layers or heads")
    return kv, slot_valid


def rotate_by(x: torch.Tensor, delta: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate x (..., n, Sm, D) by delta (n,) positions (may be negative), rotate-half layout."""
    D = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    angles = delta.to(torch.float32)[:, None] * inv_freq           # (n, D/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None, :]        # (n, 1, D)
    half = D // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * angles.cos() + rotated.float() * angles.sin()).to(x.dtype)


def chunk_blocks(mem: ChunkMemories, layer: int, memory_slot: int | None, chunk_len: int,
                 reference_len: int, theta: float):
    """Key/value blocks of every chunk for one layer, or None when there is nothing to read.

    memory_slot is the layer's index among the memory layers, or None for a layer that reads only
    the sink. Returns k, v (B, G, C, Sm, D) with keys moved before their chunk, and valid (B, C, Sm).
    """
    B, C = mem.valid.shape[:2]
    parts, valid = [], []
    if mem.sink is not None:
        sink = mem.sink[layer].to(mem.kv.dtype)                      # (2, G, D)
        G, D = sink.shape[1:]
        parts.append(sink[None, :, :, None, None, :].expand(B, 2, G, C, 1, D))
        valid.append(torch.ones(B, C, 1, dtype=torch.bool, device=mem.valid.device))
    if memory_slot is not None:
        kv = mem.kv[:, :, :, memory_slot]                             # (B, C, M, 2, G, K, D)
        parts.append(kv.permute(0, 3, 4, 1, 2, 5, 6).flatten(4, 5))  # (B, 2, G, C, M*K, D)
        valid.append(mem.valid.flatten(2, 3))
    if not parts:
        return None
    block = torch.cat(parts, dim=4)
    starts = (torch.arange(C, device=block.device) + mem.first_chunk) * chunk_len
    k = rotate_by(block[:, 0], starts - reference_len, theta)
    return k, block[:, 1], torch.cat(valid, dim=2)


class LayerMemory(NamedTuple):
    """What one layer's attention reads besides its context: blocks for the queries' chunks."""
    k: torch.Tensor          # (B, G, C, Sm, D), keys already moved before their chunk
    v: torch.Tensor          # (B, G, C, Sm, D)
    valid: torch.Tensor      # (B, C, Sm)
    q_start: int             # position of the first query
    first_chunk: int
    chunk_len: int


def memory_version(mem: ChunkMemories) -> tuple:
    """Changes when mem is edited in place (tensor version counters), so that blocks derived
    from it and cached are never stale."""
    return (mem.first_chunk, mem.kv._version, mem.valid._version,
            None if mem.sink is None else mem.sink._version)


def check_covers(q_chunk_first: int, q_chunk_last: int, first_chunk: int, n_chunks: int) -> None:
    """Chunk indices are relative to first_chunk."""
    if q_chunk_first < 0 or q_chunk_last >= n_chunks:
        raise ValueError(f"memories cover chunks {first_chunk}..{first_chunk + n_chunks - 1} but "
                         f"the queries fall in chunks {q_chunk_first + first_chunk}.."
                         f"{q_chunk_last + first_chunk}")


def layer_memory(mem: ChunkMemories, layer: int, cfg: ModelConfig,
                 q_start: int) -> LayerMemory | None:
    ids = cfg.memory_layer_ids
    slot = ids.index(layer) if layer in ids else None
    version = memory_version(mem)
    cached_version, blocks = mem._blocks.get(layer, (None, None))
    if cached_version != version:
        blocks = chunk_blocks(mem, layer, slot, cfg.chunk_len, cfg.reference_len, cfg.rope_theta)
        if not torch.is_grad_enabled():
            mem._blocks[layer] = (version, blocks)
    return None if blocks is None else LayerMemory(*blocks, q_start, mem.first_chunk, cfg.chunk_len)


def memory_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mem: LayerMemory) -> torch.Tensor:
    """Attention of q (B, H, T, D) at positions q_start.. over [own chunk block; causal context].

    k, v (B, G, S, D) are the context keys/values of positions 0..S-1 (S = q_start + T).
    On CUDA without autograd (evaluation, generation) the fused Triton kernel runs; it has no
    backward, so training takes the PyTorch path, a few chunks per SDPA call
    (memory_attention_chunked; memory_attention_torch, one call for all, is its reference).
    """
    if q.is_cuda and not (torch.is_grad_enabled() and q.requires_grad):
        from memory3.kernels import memory_attention as kernels
        if kernels.available():
            return kernels.fused_memory_attention(q, k, v, mem)
    return memory_attention_chunked(q, k, v, mem)


def memory_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mem: LayerMemory) -> torch.Tensor:
    """The reference path: one SDPA call over [all chunk blocks; context] with a block mask."""
    B, G, C, Sm, D = mem.k.shape
    T, S = q.shape[2], k.shape[2]
    q_pos = torch.arange(mem.q_start, mem.q_start + T, device=q.device)
    q_chunk = q_pos // mem.chunk_len - mem.first_chunk               # (T,)
    check_covers(int(q_chunk[0]), int(q_chunk[-1]), mem.first_chunk, C)
    own = q_chunk[:, None, None] == torch.arange(C, device=q.device)[None, :, None]  # (T, C, 1)
    mem_mask = (own[None] & mem.valid[:, None]).flatten(2)           # (B, T, C*Sm)
    causal = q_pos[:, None] >= torch.arange(S, device=q.device)[None, :]
    mask = torch.cat([mem_mask, causal[None].expand(B, T, S)], dim=-1)[:, None]
    keys = torch.cat([mem.k.flatten(2, 3), k], dim=2)
    values = torch.cat([mem.v.flatten(2, 3), v], dim=2)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                          enable_gqa=q.shape[1] != G)


def memory_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             mem: LayerMemory, group: int = 4) -> torch.Tensor:
    """memory_attention_torch's result, one SDPA call per `group` chunks: their queries over
    [their blocks; context keys up to the group's end], each query masked to its own chunk's
    block. The single masked call scores every query against every chunk's block and every
    context key, future ones included; this scores about half the context and group/C of the
    memory slots, at the price of C/group calls and of copying each group's keys next to its
    blocks. Four chunks a call (256 queries at chunk_len 64) measured fastest on a CPU: fwd+bwd
    1.3-1.8x the single call in bf16 at 512-2,048 tokens, the same call below 256
    (bench/memory_attention_chunked.py)."""
    B, G, C = mem.k.shape[:3]
    T = q.shape[2]
    L, start, first = mem.chunk_len, mem.q_start, mem.first_chunk
    check_covers(start // L - first, (start + T - 1) // L - first, first, C)
    gqa = q.shape[1] != G
    outs = []
    lo = start
    while lo < start + T:
        hi = min((lo // L + group) * L, start + T)                  # these queries: lo..hi-1
        blocks = slice(lo // L - first, (hi - 1) // L - first + 1)
        n = blocks.stop - blocks.start
        keys = torch.cat([mem.k[:, :, blocks].flatten(2, 3), k[:, :, :hi]], dim=2)
        values = torch.cat([mem.v[:, :, blocks].flatten(2, 3), v[:, :, :hi]], dim=2)
        q_pos = torch.arange(lo, hi, device=q.device)
        own = ((q_pos // L - lo // L)[:, None, None]
               == torch.arange(n, device=q.device)[None, :, None])        # (queries, n, 1)
        in_block = (own[None] & mem.valid[:, blocks, None].transpose(1, 2)).flatten(2)
        causal = q_pos[:, None] >= torch.arange(hi, device=q.device)[None, :]
        mask = torch.cat([in_block, causal[None].expand(B, hi - lo, hi)], dim=-1)[:, None]
        outs.append(F.scaled_dot_product_attention(q[:, :, lo - start:hi - start], keys, values,
                                                   attn_mask=mask, enable_gqa=gqa))
        lo = hi
    return torch.cat(outs, dim=2)
