"""bench/memdec_dictionaries.py's ablation decoder (memdec-ce): the distilled decoder's training
with beta = 0, which memdec_loss makes cross-entropy alone (CPU, ~1 s). That its training run
does not depend on the kNN targets is in test_memdec_pipeline.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memory3.memdec import memdec_loss
from memory3.model import IGNORE_INDEX


@pytest.fixture(scope="module")
def bench():
    from conftest import bench_module
    return bench_module("memdec_dictionaries")


def test_the_ablation_differs_from_the_distilled_decoder_in_beta_only(bench, tmp_path):
    (distilled_dir, distilled_beta), (ce_dir, ce_beta) = (bench.DECODERS[m]
                                                          for m in ("memdec", "memdec-ce"))
    assert (distilled_beta, ce_beta) == (0.5, 0.0) and distilled_dir == "decoder" != ce_dir
    recipes = {beta: bench.decoder_recipe(tmp_path / "shards", tmp_path / "targets", 7, beta)
               .to_dict() for beta in (distilled_beta, ce_beta)}
    assert recipes[ce_beta]["memdec"]["beta"] == 0.0
    assert recipes[ce_beta]["train"]["max_steps"] == 7
    recipes[ce_beta]["memdec"]["beta"] = distilled_beta
    assert recipes[ce_beta] == recipes[distilled_beta]


def test_beta_zero_is_cross_entropy_whatever_the_knn_targets(bench):
    """Loss and gradient bit for bit those of plain CE, for two unrelated sets of kNN targets;
    the distilled decoder's beta does see them (so the check could fail)."""
    g = torch.Generator().manual_seed(0)
    B, T, V, S = 2, 5, 11, 4
    logits = torch.randn(B, T, V, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :2] = IGNORE_INDEX

    def knn(seed):
        gen = torch.Generator().manual_seed(seed)
        ids = torch.stack([torch.randperm(V, generator=gen)[:S] for _ in range(B * T)])
        return ids.view(B, T, S), torch.rand(B, T, S, generator=gen).softmax(-1)

    def loss_and_grad(beta, knn_targets=None):
        x = logits.clone().requires_grad_()
        loss = (memdec_loss(x, targets, *knn_targets, beta) if knn_targets else
                F.cross_entropy(x.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX))
        loss.backward()
        return loss.detach(), x.grad

    ce_beta, distilled_beta = bench.DECODERS["memdec-ce"][1], bench.DECODERS["memdec"][1]
    plain_loss, plain_grad = loss_and_grad(None)
    for seed in (1, 2):
        loss, grad = loss_and_grad(ce_beta, knn(seed))
        assert torch.equal(loss, plain_loss) and torch.equal(grad, plain_grad), seed
    assert not torch.allclose(loss_and_grad(distilled_beta, knn(1))[1],
                              loss_and_grad(distilled_beta, knn(2))[1])
