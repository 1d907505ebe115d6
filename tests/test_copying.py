"""The copy probe: second-copy vs first-copy loss, against a plain computation; bad spans raise."""
import math

import pytest
import torch
import torch.nn.functional as F

from memory3.config import ModelConfig
from memory3.eval.copying import copy_probe, document_spans
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
