"""Memory Decoder math without checkpoints: training loss, interpolation, decoding, windows."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memory3.config import ModelConfig
from memory3.memdec import MemDecError, MemoryDecoderLM, memdec_loss, mix_log_probs
from memory3.memdec.targets import knn_weights, sparse_distribution
from memory3.memdec.windows import iter_row_batches, iter_window_batches
from memory3.model import IGNORE_INDEX, Transformer


def tiny_model(seed: int, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_name("tiny", **overrides)).eval()


def test_loss_equals_hand_computation():
    logits = torch.tensor([[[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 3.0, 1.0], [2.0, 1.0, 0.0, 0.0]]])
    targets = torch.tensor([[1, 2, IGNORE_INDEX]])
    # Sparse p_kNN, 3 slots: position 0 {1: 0.75, 3: 0.25}, position 1 {2: 1.0} (padded), the
    # ignored position 2 anything.
    knn_ids = torch.tensor([[[1, 3, 0], [2, 0, 0], [0, 1, 2]]])
    knn_probs = torch.tensor([[[0.75, 0.25, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]])

    def log_q(row, token):
        z = logits[0, row].tolist()
        return z[token] - math.log(sum(math.exp(v) for v in z))

    ce = -(log_q(0, 1) + log_q(1, 2)) / 2
    kl0 = 0.75 * (math.log(0.75) - log_q(0, 1)) + 0.25 * (math.log(0.25) - log_q(0, 3))
    kl1 = 1.0 * (math.log(1.0) - log_q(1, 2))
    kl = (kl0 + kl1) / 2
    for beta in (0.0, 0.3, 0.5, 1.0):
        got = memdec_loss(logits, targets, knn_ids, knn_probs, beta).item()
        assert got == pytest.approx(beta * kl + (1 - beta) * ce, rel=1e-6), beta
    # beta = 0 is the plain LM loss, bit for bit (what the model's own forward computes).
    plain = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    assert torch.equal(memdec_loss(logits, targets, knn_ids, knn_probs, 0.0), plain)


def test_loss_kl_is_zero_when_decoder_matches_knn_and_grads_flow():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = torch.log(probs.clamp_min(1e-30)).expand(1, 2, 4).clone().requires_grad_()
    ids = torch.tensor([0, 1, 2, 3]).expand(1, 2, 4)
    loss = memdec_loss(logits, torch.tensor([[0, 1]]), ids, probs.expand(1, 2, 4), beta=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().max() < 1e-5


def test_interpolation_endpoints_are_exact_and_middle_is_the_mixture():
    base, decoder = tiny_model(0), tiny_model(1, n_layers=1)
    tokens = torch.randint(5, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lb = F.log_softmax(base(tokens).logits.float(), -1)
        ld = F.log_softmax(decoder(tokens).logits.float(), -1)
    assert torch.equal(MemoryDecoderLM(base, decoder, 0.0).log_probs(tokens), lb)
    assert torch.equal(MemoryDecoderLM(base, decoder, 1.0).log_probs(tokens), ld)
    targets = tokens.roll(-1, dims=1)  # perplexity's path mixes the targets' probabilities only

    def at(log_p: torch.Tensor) -> torch.Tensor:
        return log_p.gather(-1, targets[..., None])[..., 0]

    for lam, want in ((0.0, at(lb)), (1.0, at(ld))):
        assert torch.equal(MemoryDecoderLM(base, decoder, lam).target_log_probs(tokens, targets),
                           want)
    mixture = MemoryDecoderLM(base, decoder, 0.6)
    assert torch.allclose(mixture.target_log_probs(tokens, targets),
                          at(mixture.log_probs(tokens)), atol=1e-6)
    mixed = MemoryDecoderLM(base, decoder, 0.6).log_probs(tokens)
    assert torch.allclose(mixed.exp(), 0.6 * ld.exp() + 0.4 * lb.exp(), atol=1e-6)
    assert torch.allclose(mixed.exp().sum(-1), torch.ones(2, 12), atol=1e-5)
    with pytest.raises(MemDecError, match="lambda must be in"):
        mix_log_probs(lb, ld, 1.5)


def test_vocab_mismatch_is_a_clear_error():
    with pytest.raises(MemDecError, match="vocab_size 512 but decoder has 1024"):
        MemoryDecoderLM(tiny_model(0), tiny_model(1, vocab_size=1024))


def test_decoding_with_two_kv_caches_matches_full_recompute():
    lm = MemoryDecoderLM(tiny_model(0), tiny_model(1, n_layers=1), 0.6)
    prompt = torch.randint(5, 512, (2, 5), generator=torch.Generator().manual_seed(1))
    greedy = lm.generate(prompt, 8, temperature=0)
    seq = prompt
    for _ in range(8):  # greedy by hand: argmax of the mixture over the whole prefix, no cache
        seq = torch.cat([seq, lm.log_probs(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, seq)

    sampled = [lm.generate(prompt, 8, temperature=1.0, top_k=20,
                           generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(sampled[0], sampled[1]) and sampled[0].shape == (2, 13)
    assert not torch.equal(sampled[0], greedy)
    stopped = lm.generate(prompt[:1], 8, temperature=0, eos_id=int(greedy[0, 5]))
    assert stopped.shape == (1, 6)


def test_rows_cut_the_stream_as_memory3_eval_does():
    """Rows of seq_len + 1 tokens, each scored from its own start: every token but the first of
    each row is a target, with only its own row before it (eval/perplexity.text_sequences)."""
    tokens = np.arange(100, 131)  # 31 tokens: three rows of 9, 4 left over
    batches = list(iter_row_batches(tokens, 8, batch_size=2))
    assert [x.shape for x, _ in batches] == [(2, 8), (1, 8)]
    inputs, targets = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    rows = torch.arange(100, 127).view(3, 9)
    assert torch.equal(inputs, rows[:, :-1]) and torch.equal(targets, rows[:, 1:])
    assert [len(x) for x, _ in iter_row_batches(tokens, 8, batch_size=8, max_rows=2)] == [2]
    with pytest.raises(MemDecError, match="fewer than one row of 32"):
        next(iter_row_batches(tokens, 31, batch_size=1))


@pytest.mark.parametrize("settings, message", [
    ({"seq_len": 8, "window": 8}, "takes no --window"),
    ({"max_sequences": 4}, "give --seq-len too"),
    ({"seq_len": 0}, "must be positive"),
])
def test_rows_settings_are_checked_before_anything_is_read(settings, message):
    from memory3.memdec.evaluate import evaluate
    with pytest.raises(MemDecError, match=message):
        evaluate(["no-such-run"], "no-such-shards", **settings)

def test_knn_weights_and_sparse_distribution():
    d = np.array([[0.0, 1.0, 1.0, np.inf], [np.inf, np.inf, np.inf, np.inf]])
    w = knn_weights(d, temperature=0.5)
    e = math.exp(-2.0)
    assert w[0] == pytest.approx([1 / (1 + 2 * e), e / (1 + 2 * e), e / (1 + 2 * e), 0.0])
    assert (w[1] == 0).all()
    ids, probs, kept = sparse_distribution(np.array([[7, 3, 7, 0], [1, 2, 3, 4]]), w, 10, top=2)
    assert ids[0].tolist() == [7, 3] and probs[0] == pytest.approx([1 - w[0, 1], w[0, 1]])
    assert kept[0] == pytest.approx(1.0)
    assert (probs[1] == 0).all() and (ids[1] == 0).all() and kept[1] == 0  # no neighbour
    ids, probs, kept = sparse_distribution(np.array([[1, 2, 3]]), np.array([[0.5, 0.3, 0.2]]), 10,
                                           top=2)
    assert probs[0] == pytest.approx([0.5 / 0.8, 0.3 / 0.8]) and kept[0] == pytest.approx(0.8)


@pytest.mark.parametrize("window, stride", [(8, 8), (8, 3), (5, 1)])
def test_sliding_windows_score_every_token_once_with_its_context(window, stride):
    tokens = np.arange(100, 131)
    scored = []
    for inputs, targets in iter_window_batches(tokens, window, stride, batch_size=3):
        assert inputs.shape[1] <= window
        for x, y in zip(inputs.tolist(), targets.tolist()):
            for i, t in enumerate(y):
                if t != IGNORE_INDEX:
                    assert t == x[i] + 1  # the next token of the stream
                    scored.append(t)
    assert scored == list(range(101, 131))
