"""Decoder-only transformer: config -> block -> model -> generate. Plain PyTorch."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from memory3.config import ModelConfig
from memory3.model.attention import Attention, KVCache
from memory3.model.layers import GatedMLP, RMSNorm, rotary_tables
from memory3.model.memory_attention import (ChunkMemories, check_covers, layer_memory,
                                            memory_version)

IGNORE_INDEX = -100


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = GatedMLP(cfg.d_model, cfg.d_mlp)

    def forward(self, x, cos, sin, cache=None, memory=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, memory)
        return x + self.mlp(self.mlp_norm(x))


class ModelOutput(NamedTuple):
    logits: torch.Tensor          # (B, T, vocab)
    loss: torch.Tensor | None     # mean next-token cross-entropy over non-ignored targets


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.shift = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.token_shift else None
        # fp32 rotary tables, built on first use on the device that needs them. Deliberately not
        # buffers: `.to(bf16)` (DeepSpeed's bf16 mode) would round them for good, and a model built
        # on the meta device and materialised with `to_empty` would get uninitialised tables.
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reset_parameters()

    def rotary(self, start: int, length: int, device: torch.device,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (length, head_dim) for positions start.., cast once to the activations' dtype."""
        if self._rope is None or self._rope[0].device != device:
            # References are encoded at positions 0..reference_len-1 even if contexts are shorter.
            n = max(self.cfg.max_seq_len, self.cfg.reference_len)
            self._rope = rotary_tables(self.cfg.head_dim, n, self.cfg.rope_theta, device)
        cos, sin = self._rope
        return cos[start:start + length].to(dtype), sin[start:start + length].to(dtype)

    def reset_parameters(self):
        std = self.cfg.init_std
        # Residual-branch outputs are scaled down with depth (GPT-2) so the stream's variance
        # does not grow with the number of layers.
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name == "shift":
                nn.init.zeros_(p)  # starts as the plain model and learns how much to shift
            elif p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w_down.weight")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None,
                memory: ChunkMemories | None = None, last_only: bool = False) -> ModelOutput:
        """tokens (B, T) -> logits (B, T, vocab); loss when targets (B, T) are given.

        last_only: logits of the last position only (B, 1, vocab), for a prefill that only
        samples the next token (the vocabulary projection of the others would be thrown away).

        With a cache, tokens continue the cached sequence at position `cache.length`. With
        memory, every layer reads the reference-BOS sink and memory layers read the memories of
        each query's chunk (memory_attention.py); memory=None is plain causal attention.
        """
        T = tokens.shape[1]
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len "
                             f"{self.cfg.max_seq_len}")
        x = self.embed_tokens(tokens, cache.previous if cache is not None and start else None)
        if cache is not None:
            cache.previous = tokens[:, -1]
        cos, sin = self.rotary(start, T, x.device, x.dtype)
        held = cache is not None and memory is not None and self._hold(memory, cache, start, T)
        if cache is not None:
            cache.reading = held
        for i, block in enumerate(self.blocks):
            read = None if memory is None or held else layer_memory(memory, i, self.cfg, start)
            x = block(x, cos, sin, cache, read)
        if cache is not None:
            cache.length += T
        if last_only:
            if targets is not None:
                raise ValueError("last_only gives no loss: it has logits of one position")
            x = x[:, -1:]
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                   ignore_index=IGNORE_INDEX)
        return ModelOutput(logits, loss)

    def embed_tokens(self, tokens: torch.Tensor, previous: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """The first block's input for tokens (B, T); previous (B,) is the token before
        tokens[:, 0] when they continue a sequence (decoding), else position 0 has none."""
        x = self.embed(tokens)
        if self.shift is None:
            return x
        before = self.embed(tokens[:, :-1])
        first = (self.embed(previous)[:, None] if previous is not None
                 else x.new_zeros(x.shape[0], 1, x.shape[2]))
        return x + self.shift * torch.cat([first, before], dim=1)

    def _hold(self, memory: ChunkMemories, cache: KVCache, start: int, T: int) -> bool:
        """Keep the memory block of the queries' chunk in the cache's slots (attention.py),
        written when the chunk or its memories change: True when the queries all fall in one
        chunk and its block fits. Otherwise memory_attention reads the blocks (a prefill)."""
        L = self.cfg.chunk_len
        chunk = start // L
        if cache.memory_slots == 0 or (start + T - 1) // L != chunk:
            return False
        key = (memory_version(memory), chunk)
        if cache.held_key is not None and cache.held_key[0] is memory and cache.held_key[1] == key:
            return True
        c = chunk - memory.first_chunk
        check_covers(c, c, memory.first_chunk, memory.valid.shape[1])
        blocks = [layer_memory(memory, i, self.cfg, start) for i in range(self.cfg.n_layers)]
        if any(b is not None and int(b.valid[:, c].sum(-1).max()) > cache.memory_slots
               for b in blocks):
            return False
        for i, b in enumerate(blocks):
            cache.hold(i, *((None,) * 3 if b is None else (b.k[:, :, c], b.v[:, :, c],
                                                           b.valid[:, c])))
        cache.held_key = (memory, key)
        return True

    def new_cache(self, batch_size: int, max_len: int | None = None,
                  memory_slots: int | None = None) -> KVCache:
        """memory_slots: cache slots reserved for the memory block of the chunk being decoded
        (attention.py); default: room for the sink and a full chunk's memories."""
        p = self.embed.weight
        if memory_slots is None:
            memory_slots = 1 + self.cfg.memories_per_chunk * self.cfg.memory_top_k
        return KVCache(self.cfg, batch_size, max_len or self.cfg.max_seq_len, p.device, p.dtype,
                       memory_slots)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, eos_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue prompt (B, T) by up to max_new_tokens; temperature 0 is greedy decoding.

        Returns (B, T + n) tokens. Sequences that emit eos_id keep emitting it so the batch stays
        rectangular; generation stops early once all have.
        """
        B, T = prompt.shape
        total = min(T + max_new_tokens, self.cfg.max_seq_len)
        cache = self.new_cache(B, total)
        logits = self(prompt, cache=cache).logits[:, -1]
        out = [prompt]
        done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
        for _ in range(total - T):
            nxt = sample_next(logits, temperature, top_k, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out.append(nxt[:, None])
            if (eos_id is not None and bool(done.all())) or cache.length >= total:
                break
            logits = self(nxt[:, None], cache=cache).logits[:, -1]
        return torch.cat(out, dim=1)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, vocab) -> next token ids (B,)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
