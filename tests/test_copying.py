"""The copy probe: second-copy vs first-copy loss, against a plain computation; bad spans raise."""
import math

import pytest
import torch
import torch.nn.functional as F

from memory3.config import ModelConfig
from memory3.data.tokenizer import REF_BOS_ID
from memory3.eval.copying import copy_probe, document_spans, memory_copy_probe
from memory3.model import Transformer


def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name("tiny")).eval()


def test_copy_probe_matches_a_plain_computation():
    m = model()
    g = torch.Generator().manual_seed(0)
    spans = torch.randint(5, 512, (5, 12), generator=g).tolist()
    got = copy_probe(m, spans, bos_id=1, batch_size=2)  # batches of 2, 2 and 1
    first, second = [], []
    for span in spans:
        x = torch.tensor([[1, *span, *span]])
        with torch.no_grad():
            logp = F.log_softmax(m(x[:, :-1]).logits[0].double(), -1)
        nll = [-logp[j, x[0, j + 1]].item() for j in range(x.shape[1] - 1)]
        first += nll[1:12]      # tokens 2..12 of the first copy (token 1 follows only BOS)
        second += nll[13:]      # tokens 2..12 of the second copy
    assert got["spans"] == 5 and got["length"] == 12
    assert got["first_copy_loss"] == pytest.approx(sum(first) / len(first), rel=1e-5)
    assert got["second_copy_loss"] == pytest.approx(sum(second) / len(second), rel=1e-5)
    assert got["ratio"] == pytest.approx(got["second_copy_loss"] / got["first_copy_loss"])
    # An untrained model uses nothing of its context: both copies cost about log(vocab).
    assert got["ratio"] == pytest.approx(1.0, abs=0.05)
    assert got["first_copy_loss"] == pytest.approx(math.log(512), rel=0.1)


def test_copy_probe_rejects_bad_spans():
    m = model()
    with pytest.raises(ValueError, match="no spans"):
        copy_probe(m, [], bos_id=1)
    with pytest.raises(ValueError, match="one length"):
        copy_probe(m, [[5, 6, 7], [5, 6]], bos_id=1)
    with pytest.raises(ValueError, match="max_seq_len"):
        copy_probe(m, [list(range(5, 205))], bos_id=1)


def test_document_spans_reads_only_as_far_as_it_needs():
    read = []

    def docs():
        for n in (3, 10, 2, 12, 15, 20):
            read.append(n)
            yield list(range(n))

    assert document_spans(docs(), 10, max_spans=2) == [list(range(10)), list(range(10))]
    assert read == [3, 10, 2, 12]


def test_dense_memory_copy_reads_the_span_as_its_text_in_front_of_the_chunk():
    # SPEC 1b: a memory's keys are rotated to sit just before its chunk, as if its text stood
    # there. Kept dense and read by every layer, it must then score exactly as [ref-BOS span]
    # written in front of [BOS span] (no token shift: that would mix the two texts at BOS).
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", memory_layers="all", reference_len=16, chunk_len=16)
    m = Transformer(cfg).eval()
    spans = torch.randint(5, 512, (3, 15), generator=torch.Generator().manual_seed(1)).tolist()
    got = memory_copy_probe(m, spans, bos_id=1, top_k=15, batch_size=2)
    nll = []
    for span in spans:
        x = torch.tensor([[REF_BOS_ID, *span, 1, *span]])
        with torch.no_grad():
            loss = F.cross_entropy(m(x[:, :-1]).logits[0].float(), x[0, 1:], reduction="none")
        nll += loss[17:].tolist()           # span tokens 2..15 after BOS (position 16)
    assert got["top_k"] == 15 and got["spans"] == 3 and got["length"] == 15
    assert got["memory_loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-4)
    # top_k is honoured: 2 kept tokens read differently (an untrained model barely attends, so
    # the difference is small, yet far above float noise).
    sparse = memory_copy_probe(m, spans, bos_id=1, top_k=2)
    assert sparse["top_k"] == 2 and sparse["alone_loss"] == pytest.approx(got["alone_loss"])
    assert abs(sparse["memory_loss"] - got["memory_loss"]) > 1e-5


def test_memory_copy_probe_rejects_spans_longer_than_a_reference():
    m = Transformer(ModelConfig.from_name("tiny", memory_layers="all", reference_len=16)).eval()
    with pytest.raises(ValueError, match="reference_len 16"):
        memory_copy_probe(m, [list(range(5, 21))], bos_id=1)
    with pytest.raises(ValueError, match="top_k must lie in 1..15"):
        memory_copy_probe(m, [list(range(5, 15))], bos_id=1, top_k=16)
