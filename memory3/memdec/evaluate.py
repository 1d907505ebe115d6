"""`memory3 memdec eval`: perplexity and speed of base models alone, with kNN-LM, and with a
Memory Decoder, on held-out token shards.

Every mode scores the same tokens with the same sliding windows (windows.py), or, with seq_len,
in the rows `memory3 eval` cuts (the same tokens and contexts as its modes). Modes are timed
batch by batch, interleaved (base, kNN-LM, decoder, base, ...), so machine noise hits all alike;
each model first runs one untimed batch. tokens_per_s counts scored tokens; time_vs_base is a
mode's time over its base's time on the same batches.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from memory3.data import TokenShards
from memory3.memdec.datastore import Datastore
from memory3.memdec.files import (MemDecError, checkpoint_identity, checkpoint_tokenizer,
                                  data_identity)
from memory3.memdec.knnlm import KnnLM
from memory3.memdec.mixture import MemoryDecoderLM, check_compatible, target_log_probs
from memory3.memdec.windows import iter_row_batches, iter_window_batches
from memory3.model import IGNORE_INDEX, Transformer

# A mode: (inputs, targets) -> log p(target) (B, T), anything at ignored positions.
Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def evaluate(bases: list[str | Path], data: str | Path, *, split: str = "valid",
             decoder: str | Path | None = None, lam: float = 0.6,
             knn_datastore: str | Path | None = None, knn_lambda: float = 0.25,
             knn_k: int = 1024, knn_temperature: float = 1.0, knn_exact: bool = False,
             window: int | None = None, stride: int | None = None,
             seq_len: int | None = None, max_sequences: int | None = None,
             max_tokens: int | None = None, batch_size: int = 8,
             device: str | torch.device | None = None,
             progress: bool = True) -> list[dict[str, Any]]:
    """One result per base and mode ("base", "knn-lm", "memdec"): perplexity, tokens/s, ...

    seq_len: score rows of seq_len + 1 tokens, each from its own start (windows.iter_row_batches,
    `memory3 eval`'s cut), at most max_sequences of them, instead of sliding windows.
    """
    from memory3.checkpoints import load_model

    if not bases:
        raise MemDecError("give at least one --base checkpoint")
    if seq_len is not None and (window is not None or stride is not None):
        raise MemDecError("--seq-len cuts rows as `memory3 eval` does; it takes no --window or "
                          "--stride (those are for sliding windows)")
    if max_sequences is not None and seq_len is None:
        raise MemDecError("--max-sequences counts rows of --seq-len tokens: give --seq-len too")
    if (seq_len is not None and seq_len <= 0) or (max_sequences is not None
                                                  and max_sequences <= 0):
        raise MemDecError(f"--seq-len and --max-sequences must be positive, got {seq_len} and "
                          f"{max_sequences}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shards = TokenShards(data, split)
    # Checkpoints do not carry their tokenizer; their training data's manifest names it.
    data_tokenizer = data_identity(data, split)["tokenizer_sha256"]
    for ckpt in [*bases, *([decoder] if decoder else [])]:
        sha = checkpoint_tokenizer(ckpt)
        if sha and sha != data_tokenizer:
            raise MemDecError(f"{data} was tokenized with another tokenizer than the one {ckpt} "
                              f"was trained with")
    models = {str(b): load_model(b, device)[0] for b in bases}
    decoder_model = load_model(decoder, device)[0] if decoder else None
    knn_store = _open_knn_datastore(knn_datastore, data, split) if knn_datastore else None
    encoder = None
    if knn_store:
        encoder = next((m for b, m in models.items() if _same_checkpoint(b, knn_store)), None)
        encoder = encoder or load_model(knn_store.base["checkpoint"], device)[0]
    involved = [*models.values(), *[m for m in (decoder_model, encoder) if m is not None]]
    max_len = min(m.cfg.max_seq_len for m in involved)  # what every model involved reads
    n = len(shards) if max_tokens is None else min(len(shards), max_tokens + 1)
    if seq_len is not None:
        if seq_len > max_len:
            raise MemDecError(f"--seq-len {seq_len} is longer than the models involved read "
                              f"(smallest max_seq_len {max_len})")
        if max_sequences is not None:
            n = min(n, max_sequences * (seq_len + 1))
        batches = list(iter_row_batches(shards.read(0, n), seq_len, batch_size, max_sequences))
        settings = {"data": str(data), "split": split, "seq_len": seq_len,
                    "sequences": sum(len(x) for x, _ in batches)}
    else:
        window = window or max_len
        stride = stride or max(1, window // 2)
        batches = list(iter_window_batches(shards.read(0, n), window, stride, batch_size))
        settings = {"data": str(data), "split": split, "window": window, "stride": stride}

    results = []
    for base_path, base in models.items():
        modes: dict[str, tuple[Scorer, dict[str, Any]]] = {"base": (model_scorer(base), {})}
        if knn_store:
            knn = KnnLM(knn_store, encoder, k=knn_k, temperature=knn_temperature, lam=knn_lambda,
                        exact=knn_exact)
            modes["knn-lm"] = (lambda x, y, knn=knn, base=base: knn.target_log_probs(x, y, base),
                               {"datastore": str(knn_datastore), "lambda": knn_lambda, "k": knn_k,
                                "temperature": knn_temperature, "exact_distances": knn_exact})
        if decoder_model is not None:
            check_compatible(base, decoder_model, f"base {base_path}", f"decoder {decoder}")
            mixture = MemoryDecoderLM(base, decoder_model, lam)
            modes["memdec"] = (model_scorer(mixture), {"decoder": str(decoder), "lambda": lam})
        scores = run_modes({name: scorer for name, (scorer, _) in modes.items()}, batches,
                            device, desc=f"eval {base_path}", progress=progress)
        for name, (_, extra) in modes.items():
            nll, count, seconds = scores[name]
            results.append({"base": base_path, "base_model": base.cfg.name,
                            "base_params": base.cfg.n_params, "mode": name,
                            "perplexity": math.exp(nll / count), "nll_per_token": nll / count,
                            "tokens": int(count), "seconds": seconds,
                            "tokens_per_s": count / seconds,
                            "time_vs_base": seconds / scores["base"][2], **extra, **settings})
    return results


def model_scorer(model: Transformer | MemoryDecoderLM) -> Scorer:
    """The mode of a plain model or of a base + decoder mixture."""
    if isinstance(model, MemoryDecoderLM):
        return model.target_log_probs
    return lambda inputs, targets: target_log_probs(model(inputs).logits, targets)


@torch.no_grad()
def run_modes(modes: dict[str, Scorer], batches: list, device: torch.device, desc: str,
               progress: bool) -> dict[str, tuple[float, float, float]]:
    """mode -> (summed NLL, scored tokens, seconds), modes interleaved per batch."""
    totals = {name: [0.0, 0.0, 0.0] for name in modes}
    first_inputs, first_targets = batches[0]
    for scorer in modes.values():  # untimed: first-call allocations and thread start-up
        scorer(first_inputs.to(device), first_targets.to(device))
    for inputs, targets in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        inputs, targets = inputs.to(device), targets.to(device)
        scored = targets != IGNORE_INDEX
        for name, scorer in modes.items():
            start = time.perf_counter()
            log_p = scorer(inputs, targets)[scored]
            nll = -log_p.sum().item()  # .item() waits for the device: the time is complete
            totals[name][2] += time.perf_counter() - start
            totals[name][0] += nll
            totals[name][1] += scored.sum().item()
    return {name: tuple(t) for name, t in totals.items()}


def _open_knn_datastore(path: str | Path, data: str | Path, split: str) -> Datastore:
    store = Datastore(path)
    held_out = data_identity(data, split)
    if held_out["tokenizer_sha256"] != store.data["tokenizer_sha256"]:
        raise MemDecError(f"datastore {path} was built from text of another tokenizer than {data}")
    if (held_out["fingerprint"], split) == (store.data["fingerprint"], store.data["split"]):
        raise MemDecError(f"datastore {path} holds split {split!r} of {data} itself: kNN-LM would "
                          f"retrieve the very tokens it predicts; evaluate on held-out data")
    return store


def _same_checkpoint(path: str, store: Datastore) -> bool:
    return checkpoint_identity(path)["checkpoint"] == store.base["checkpoint"]


def format_table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'base':<40} {'mode':<8} {'perplexity':>10} {'tokens/s':>10} {'x base time':>11}"]
    for r in results:
        lines.append(f"{r['base'][-40:]:<40} {r['mode']:<8} {r['perplexity']:>10.3f} "
                     f"{r['tokens_per_s']:>10.0f} {r['time_vs_base']:>11.2f}")
    return "\n".join(lines)
