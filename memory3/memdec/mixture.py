"""Inference with a Memory Decoder: p = lambda * p_dec + (1 - lambda) * p_base (SPEC section 2).

The base and the decoder run side by side, each with its own KV cache; their next-token
distributions are mixed in probability space, computed in log space (logaddexp) so that tiny
probabilities do not underflow. No retrieval at inference: any base that shares the decoder's
tokenizer (hence its output vocabulary) can use it unchanged.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from memory3.memdec.files import MemDecError, checkpoint_tokenizer
from memory3.memdec.windows import iter_window_batches
from memory3.model import IGNORE_INDEX, KVCache, Transformer
from memory3.model.transformer import sample_next


def mix_log_probs(base_logits: torch.Tensor, decoder_logits: torch.Tensor,
                  lam: float) -> torch.Tensor:
    """log(lam * softmax(decoder) + (1 - lam) * softmax(base)), fp32, any leading shape.

    lam = 0 gives log_softmax(base) exactly and lam = 1 log_softmax(decoder) exactly: the other
    side enters as log(0) = -inf, and logaddexp(x, -inf) = x.
    """
    if not 0 <= lam <= 1:
        raise MemDecError(f"lambda must be in [0, 1], got {lam}")
    log_base = F.log_softmax(base_logits.float(), dim=-1)
    log_dec = F.log_softmax(decoder_logits.float(), dim=-1)
    return torch.logaddexp(log_dec + log_or_minus_inf(lam),
                           log_base + log_or_minus_inf(1 - lam))


def target_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits) at targets (B, T) in fp32; IGNORE_INDEX positions read token 0."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return log_p.gather(-1, targets.clamp_min(0)[..., None])[..., 0]


def log_or_minus_inf(x: float) -> float:
    """log x, with log 0 = -inf (math.log raises): a mixture weight of 0 drops that side."""
    return math.log(x) if x > 0 else -math.inf


def check_compatible(base: Transformer, decoder: Transformer, base_name: str = "base",
                     decoder_name: str = "decoder") -> None:
    if base.cfg.vocab_size != decoder.cfg.vocab_size:
        raise MemDecError(f"{base_name} has vocab_size {base.cfg.vocab_size} but {decoder_name} "
                          f"has {decoder.cfg.vocab_size}: a Memory Decoder only works with base "
                          f"models that share its tokenizer and output vocabulary")


def check_same_tokenizer(checkpoints: list[str | Path]) -> None:
    """Refuse checkpoints whose training data records different tokenizers (when known)."""
    known = {str(c): sha for c in checkpoints if (sha := checkpoint_tokenizer(c))}
    if len(set(known.values())) > 1:
        listing = ", ".join(f"{c} ({sha[:12]})" for c, sha in known.items())
        raise MemDecError(f"these checkpoints were trained with different tokenizers: {listing}")


class MemoryDecoderLM:
    """A base LM plus a Memory Decoder, mixed with weight `lam` on the decoder."""

    def __init__(self, base: Transformer, decoder: Transformer, lam: float = 0.6):
        check_compatible(base, decoder)
        if not 0 <= lam <= 1:
            raise MemDecError(f"lambda must be in [0, 1], got {lam}")
        self.base, self.decoder, self.lam = base.eval(), decoder.eval(), lam
        self.max_seq_len = min(base.cfg.max_seq_len, decoder.cfg.max_seq_len)

    @classmethod
    def from_checkpoints(cls, base: str | Path, decoder: str | Path, lam: float = 0.6,
                         device: str | torch.device = "cpu") -> "MemoryDecoderLM":
        from memory3.checkpoints import load_model

        check_same_tokenizer([base, decoder])
        base_model, _, _ = load_model(base, device)
        decoder_model, _, _ = load_model(decoder, device)
        check_compatible(base_model, decoder_model, f"base {base}", f"decoder {decoder}")
        return cls(base_model, decoder_model, lam)

    def new_caches(self, batch_size: int, max_len: int) -> tuple[KVCache, KVCache]:
        return self.base.new_cache(batch_size, max_len), self.decoder.new_cache(batch_size, max_len)

    @torch.no_grad()
    def log_probs(self, tokens: torch.Tensor,
                  caches: tuple[KVCache, KVCache] | None = None) -> torch.Tensor:
        """tokens (B, T) -> mixed next-token log-probabilities (B, T, vocab), fp32."""
        base_cache, decoder_cache = caches or (None, None)
        return mix_log_probs(self.base(tokens, cache=base_cache).logits,
                             self.decoder(tokens, cache=decoder_cache).logits, self.lam)

    @torch.no_grad()
    def target_log_probs(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(target) (B, T) under the mixture, as log_probs(tokens) gathered at targets but
        mixing only the targets' probabilities: all that perplexity needs."""
        log_base = target_log_probs(self.base(tokens).logits, targets)
        log_dec = target_log_probs(self.decoder(tokens).logits, targets)
        return torch.logaddexp(log_dec + log_or_minus_inf(self.lam),
                               log_base + log_or_minus_inf(1 - self.lam))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, eos_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue prompt (B, T) from the mixture; temperature 0 is greedy decoding.

        Same contract as Transformer.generate: (B, T + n) tokens, finished rows repeat eos_id.
        """
        B, T = prompt.shape
        total = min(T + max_new_tokens, self.max_seq_len)
        caches = self.new_caches(B, total)
        log_p = self.log_probs(prompt, caches)[:, -1]
        out = [prompt]
        done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
        for _ in range(total - T):
            # Sampling from softmax(log p / temperature) samples p itself at temperature 1.
            nxt = sample_next(log_p, temperature, top_k, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out.append(nxt[:, None])
            if (eos_id is not None and bool(done.all())) or caches[0].length >= total:
                break
            log_p = self.log_probs(nxt[:, None], caches)[:, -1]
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def perplexity(self, tokens: np.ndarray, *, window: int | None = None,
                   stride: int | None = None, batch_size: int = 8) -> float:
        """Perplexity of the 1-D token stream under the mixture (sliding windows, windows.py)."""
        window = window or self.max_seq_len
        device = self.base.embed.weight.device
        nll = count = 0.0
        for inputs, targets in iter_window_batches(tokens, window, stride or window, batch_size):
            inputs, targets = inputs.to(device), targets.to(device)
            scored = targets != IGNORE_INDEX
            nll -= self.target_log_probs(inputs, targets)[scored].sum().item()
            count += scored.sum().item()
        return math.exp(nll / count)
