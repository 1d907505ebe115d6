"""Memory encoder: references -> sparse key/value memories (SPEC section 1, "A reference").

A batch of references (reference-BOS first, right padding) runs through the model as an ordinary
causal forward, only as deep as the deepest memory layer. At every memory layer and KV head the
`memory_top_k` tokens that receive the most attention are kept, with their keys and values:

    received[j] = sum over real queries i (the reference-BOS included) and over the query heads of
                  the KV group of softmax_j(q_i . k_j / sqrt(D)), the softmax over real keys only

with q and k *without* rotary positions and no causal mask. The reference-BOS (position 0) and
padding are never kept. Kept keys carry rotary at their original position (rotary before selection),
so a memory reads like the text it came from, at positions 1..L-1.

Decisions (SPEC 1b): the query heads of a KV group are summed. Ties go to the lower position, and
equal keys tie exactly (see `attention_received`), so a reference's memory does not depend on the
batch it was encoded in. Slots are sorted by position; a reference with fewer than K tokens besides
the reference-BOS fills the remaining (last) slots with position 0 and zero key/value, which
`EncodedMemories.mask` marks empty.
Selection is a discrete choice, so it never carries gradient. `grad` picks what the kept keys and
values carry back to the weights (continual training, `continual.encode_grad`):
  "none"  nothing (building banks, evaluation).
  "kv"    only the memory layers' key/value projections (and their input norms): the forward runs
          without autograd and the kept tokens' inputs are projected again with it. Costs a few
          small matmuls, yet lets keys and values become readable as memories, which they never
          are trained to be otherwise (see bench/RESULTS.md, knowledge_reading).
  "full"  everything, through the reference's whole forward: about a training forward+backward.

Shapes: N references, L padded length (<= reference_len), H query heads, G KV heads, R = H / G,
D head dim, K = memory_top_k, L_mem = number of memory layers.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memory3.data.tokenizer import REF_BOS_ID
from memory3.model import Transformer
from memory3.model.layers import apply_rotary


GRAD_MODES = ("none", "kv", "full")


@dataclass
class EncodedMemories:
    kv: torch.Tensor         # (N, L_mem, 2, G, K, D): [k, v]; k rotated at its original position
    positions: torch.Tensor  # (N, L_mem, G, K) long: position in the reference (1..L-1); 0 = empty

    @property
    def mask(self) -> torch.Tensor:
        """(N, L_mem, G, K) bool: True where a slot holds a token."""
        return self.positions > 0

    def __len__(self) -> int:
        return self.kv.shape[0]

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> EncodedMemories:
        """kv to device and dtype; positions stay long and only move."""
        return EncodedMemories(self.kv.to(device=device, dtype=dtype),
                               self.positions.to(device=device))

    def __getitem__(self, idx) -> EncodedMemories:
        """Index the N axis; an int keeps the axis (a batch of one), so shapes stay as documented."""
        if isinstance(idx, int):
            idx = [idx]
        return EncodedMemories(self.kv[idx], self.positions[idx])


@torch.no_grad()
def attention_received(q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """received (N, G, L) fp32: the attention each key receives from the real queries of its KV
    group's R heads, softmax over real keys, no causal mask; padding keys score 0.

    q (N, H, L, D) and k (N, G, L, D) are unrotated; lengths (N,) count the reference-BOS.
    Scores are computed in fp32 whatever the model's dtype.

    Equal keys must score bit-for-bit equal, whatever their positions and the padded length L:
    a token repeated in a reference has the same key at the first layer (its input is the
    embedding alone), and "ties go to the lower position" is what keeps a reference's memory
    independent of the batch it was encoded in (multi-rank builds deal references to ranks, so
    batches differ; SPEC 1d). So the keys are the *rows* of every intermediate and each key's score
    is a reduction along its own contiguous row. Reducing over queries across key columns instead
    (a vector-matrix bmm, or a sum over a non-innermost dim) accumulates different columns in
    different orders (BLAS kernels treat the tail columns of a block apart), which broke such ties
    by one ulp toward whatever columns the kernel favoured at that L.
    """
    N, H, L, D = q.shape
    G = k.shape[1]
    R = H // G
    real = torch.arange(L, device=q.device) < lengths[:, None]              # (N, L)
    # Query heads g*R .. g*R+R-1 share KV head g (as SDPA's enable_gqa): viewing them as R*L
    # queries of group g scores a whole layer in one batched matmul without repeating k. baddbmm
    # applies the scale and the padding-key mask inside that matmul, not in extra passes.
    key_bias = torch.zeros(N, L, device=q.device).masked_fill_(~real, float("-inf"))
    # One copy each, to contiguous fp32 (whatever the model's dtype and q/k's strides).
    q32, k32 = (torch.empty(x.shape, dtype=torch.float32, device=x.device).copy_(x) for x in (q, k))
    logits = torch.baddbmm(key_bias.repeat_interleave(G, dim=0)[:, :, None],         # (N*G, L, 1)
                           k32.view(N * G, L, D), q32.view(N * G, R * L, D).transpose(1, 2),
                           alpha=D ** -0.5)                                 # (N*G, L keys, R*L)
    probs = logits.softmax(dim=1)                                           # over keys
    query_pad = (~real).repeat(1, R).repeat_interleave(G, dim=0)            # (N*G, R*L)
    return probs.masked_fill_(query_pad[:, None, :], 0).sum(dim=-1).view(N, G, L)


@torch.no_grad()
def select_positions(q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor,
                     top_k: int) -> torch.Tensor:
    """The top_k most attended positions per reference and KV head: (N, G, K) long, ascending,
    then 0 for empty slots. q, k, lengths as in `attention_received`.
    """
    L = q.shape[2]
    received = attention_received(q, k, lengths)
    selectable = torch.arange(L, device=q.device) < lengths[:, None]
    selectable[:, 0] = False                                                # the reference-BOS
    received.masked_fill_(~selectable[:, None, :], float("-inf"))
    if L < top_k:
        received = F.pad(received, (0, top_k - L), value=float("-inf"))
    # A stable descending sort keeps equal scores in position order: ties go to the lower position.
    ranked = received.sort(dim=-1, descending=True, stable=True)
    top_score, top_pos = ranked.values[..., :top_k], ranked.indices[..., :top_k]
    empty_last = received.shape[-1]  # sorts after every real position
    pos = torch.where(top_score > float("-inf"), top_pos, empty_last).sort(dim=-1).values
    return pos.masked_fill(pos == empty_last, 0)


def _gather_positions(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x (N, G, L, D), pos (N, G, K) -> (N, G, K, D)."""
    return x.gather(2, pos[..., None].expand(-1, -1, -1, x.shape[-1]))


class MemoryEncoder:
    """Encodes references with a model's own weights into `EncodedMemories`.

    `ref_bos_id` is only used by `sink_kv`; `encode` takes tokens already packed
    (see `memory3.memory.references.pack_references`).
    """

    def __init__(self, model: Transformer, ref_bos_id: int = REF_BOS_ID,
                 top_k: int | None = None):
        self.model = model
        self.layer_ids = model.cfg.memory_layer_ids
        if not self.layer_ids:
            raise ValueError("the model has no memory layers (model.memory_layers is 'none')")
        # Another top_k than the model's makes memories no bank of this model stores: for probes
        # of what sparsity keeps (eval/copying.py).
        self.top_k = model.cfg.memory_top_k if top_k is None else top_k
        if not 0 < self.top_k < model.cfg.reference_len:
            raise ValueError(f"top_k must lie in 1..{model.cfg.reference_len - 1} (reference_len "
                             f"- 1), got {self.top_k}")
        self.ref_bos_id = ref_bos_id

    def encode(self, tokens: torch.Tensor, lengths: torch.Tensor, *,
               grad: str = "none") -> EncodedMemories:
        """tokens (N, L) long, reference-BOS first and right-padded; lengths (N,) include the BOS.
        grad: "none", "kv" or "full" (module docstring)."""
        if grad not in GRAD_MODES:
            raise ValueError(f"encode: grad must be one of {GRAD_MODES}, got {grad!r}")
        self._check(tokens, lengths)
        lengths = lengths.to(tokens.device)
        cos, sin = self._rotary(tokens.shape[1])
        kv, positions = [], []
        with torch.set_grad_enabled(grad == "full"):  # the trunk: "kv" re-projects below
            for i, x, q, k, v in self._attention_inputs(tokens, self.layer_ids, cos, sin):
                pos = select_positions(q, k, lengths, self.top_k)          # (N, G, K)
                with torch.set_grad_enabled(grad != "none"):
                    if grad == "kv":
                        k_kept, v_kept = self._project_kept(i, x, pos)
                    else:
                        k_kept, v_kept = _gather_positions(k, pos), _gather_positions(v, pos)
                    # Rotary is per position, so rotating the kept keys alone equals rotating all
                    # of them and then selecting, bit for bit.
                    k_kept = apply_rotary(k_kept, cos[pos], sin[pos])
                    layer_kv = torch.stack([k_kept, v_kept], dim=1)
                    kv.append(layer_kv.masked_fill((pos == 0)[:, None, :, :, None], 0))
                positions.append(pos)
        return EncodedMemories(torch.stack(kv, dim=1), torch.stack(positions, dim=1))

    def _project_kept(self, layer: int, x: torch.Tensor, pos: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unrotated k, v (N, G, K, D) of the kept positions pos (N, G, K), projected from the
        layer's block input x (N, L, d_model, no autograd history) with autograd on."""
        block = self.model.blocks[layer]
        attn = block.attn
        N, G, K = pos.shape
        h = block.attn_norm(_gather_positions(x[:, None].expand(-1, G, -1, -1), pos))
        # Through the module rather than its weight (which ZeRO-3 partitions outside forward):
        # every head's projection of the kept inputs, then each KV head's own.
        _, k, v = attn.wqkv(h).split(attn.split_sizes, dim=-1)    # (N, G, K, G * D)
        own = torch.arange(G, device=pos.device)
        return tuple(t.view(N, G, K, G, attn.head_dim)[:, own, :, own].transpose(0, 1)
                     for t in (k, v))

    def sink_kv(self, *, grad: bool = False) -> torch.Tensor:
        """(n_layers, 2, G, D): key and value of the reference-BOS alone at position 0, at every
        layer: the attention sink that memory attention puts in front of everything. Depends only
        on the weights (causal attention: position 0 sees nothing else)."""
        device = self.model.embed.weight.device
        tokens = torch.tensor([[self.ref_bos_id]], device=device)
        cos, sin = self._rotary(1)
        with torch.set_grad_enabled(grad):
            # Rotary at position 0 is the identity, so the unrotated key is the stored one.
            layers = self._attention_inputs(tokens, range(self.model.cfg.n_layers), cos, sin)
            return torch.stack([torch.stack([k[0, :, 0], v[0, :, 0]]) for *_, k, v in layers])

    def _rotary(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.model.embed.weight
        return self.model.rotary(0, length, w.device, w.dtype)

    def _check(self, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        if tokens.dim() != 2 or tokens.shape[0] == 0 or lengths.shape != tokens.shape[:1]:
            raise ValueError(f"encode: expected tokens (N, L) with N >= 1 and lengths (N,), got "
                             f"{tuple(tokens.shape)} and {tuple(lengths.shape)}")
        L, max_len = tokens.shape[1], self.model.cfg.max_seq_len
        if L > max_len:
            raise ValueError(f"encode: references of {L} positions exceed max_seq_len {max_len}")
        if int(lengths.min()) < 1 or int(lengths.max()) > L:
            raise ValueError(f"encode: lengths must lie in 1..{L} (they count the reference-BOS), "
                             f"got {int(lengths.min())}..{int(lengths.max())}")

    def _attention_inputs(self, tokens: torch.Tensor, layer_ids: Iterable[int], cos: torch.Tensor,
                          sin: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor,
                                                               torch.Tensor, torch.Tensor]]:
        """Run tokens (N, L) through the blocks as an ordinary causal forward, only as deep as the
        last of layer_ids (ascending), yielding (layer, x, q (N, H, L, D), k (N, G, L, D), v) of
        each of them: x (N, L, d_model) is the block's input, q, k, v the projections of its
        attention input (after attn_norm), q and k unrotated.

        Those layers mirror Block.forward and Attention.forward step by step, because the
        projections must be seen before rotary; computing them once serves both the selection and
        the forward. Right padding needs no mask here: causal attention hides it from real tokens,
        and every padding row still sees the reference-BOS, so nothing becomes NaN.
        """
        wanted = set(layer_ids)
        last = max(wanted)
        x = self.model.embed_tokens(tokens)
        N, L, _ = x.shape
        for i, block in enumerate(self.model.blocks[:last + 1]):
            if i not in wanted:
                x = block(x, cos, sin)
                continue
            attn = block.attn
            q, k, v = attn.wqkv(block.attn_norm(x)).split(attn.split_sizes, dim=-1)
            q = q.view(N, L, attn.n_heads, attn.head_dim).transpose(1, 2)
            k = k.view(N, L, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
            v = v.view(N, L, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
            yield i, x, q, k, v
            if i == last:
                return  # nothing reads this layer's output: skip its attention and MLP
            out = attn.attend(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)
            x = x + attn.wo(out.transpose(1, 2).reshape(N, L, -1))
            x = x + block.mlp(block.mlp_norm(x))
