"""When does a small model learn to copy from its context, with and without model.token_shift?

Issue 15's first route: a model that reads. Real text: Python source of the installed packages
(site-packages; every 8th top-level package held out for the probe), a sentencepiece tokenizer
trained on the training files, and the same model trained twice on the same batches in the same
order, once per side, in a plain PyTorch loop (bf16 autocast, constant lr after a short warmup).
Every --probe-every tokens both sides run the copy probe (memory3.eval.copying: held-out spans
fed twice; loss on the second copy / on the first). Prints both curves side by side.

    python bench/copy_emergence.py --tokens 12e6 --out bench_runs/copy
"""
from __future__ import annotations

import argparse
import json
import math
import site
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory3.config import ModelConfig  # noqa: E402
from memory3.data import Tokenizer, train_tokenizer  # noqa: E402
from memory3.eval.copying import copy_probe, document_spans  # noqa: E402
from memory3.model import Transformer  # noqa: E402
from memory3.train.trainer import param_groups  # noqa: E402  (norms and the gate: no decay)
from pkgcode import python_files  # noqa: E402  (the cpu-warmup split)


def corpus(out: Path, root: Path) -> dict[str, Path]:
    """train.jsonl / probe.jsonl: one file per document."""
    paths = {"train": out / "train.jsonl", "probe": out / "probe.jsonl"}
    for split, path in paths.items():
        if path.exists():
            continue
        with open(path.with_suffix(".tmp"), "w") as f:
            for file in python_files(root, held_out=split == "probe"):
                text = file.read_text(encoding="utf-8", errors="replace")
                if len(text) > 500:
                    f.write(json.dumps({"text": text}) + "\n")
        path.with_suffix(".tmp").rename(path)
    return paths


def token_stream(tok: Tokenizer, path: Path, n_tokens: int, cache: Path) -> np.ndarray:
    if cache.exists():
        ids = np.load(cache)
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    out, total = [], 0
    for line in open(path):
        ids = [tok.bos_id, *tok.encode(json.loads(line)["text"]), tok.eos_id]
        out.append(np.asarray(ids, dtype=np.int32))
        total += len(ids)
        if total >= n_tokens:
            break
    ids = np.concatenate(out)
    if len(ids) < n_tokens:
        print(f"only {len(ids):,} training tokens (asked {n_tokens:,})")
    np.save(cache, ids)
    return ids[:n_tokens]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="bench_runs/copy")
    p.add_argument("--tokens", type=float, default=12e6, help="training tokens per side")
    p.add_argument("--probe-every", type=float, default=1e6)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--span", type=int, default=100, help="copy probe span length")
    p.add_argument("--sides", default="shift,plain")
    args = p.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = corpus(out, Path(site.getsitepackages()[0]))
    tok_dir = out / "tokenizer"
    tok = (Tokenizer(tok_dir) if (tok_dir / "tokenizer.model").exists()
           else train_tokenizer([files["train"]], tok_dir, args.vocab, max_sentences=300_000,
                                progress=False))
    n = int(args.tokens)
    stream = torch.from_numpy(token_stream(tok, files["train"], n + 1, out / "train-ids.npy")
                              .astype(np.int64))
    spans = document_spans((tok.encode(json.loads(line)["text"]) for line in open(files["probe"])),
                           args.span, max_spans=64)
    per_step = args.batch * args.seq_len
    steps = len(stream) // per_step
    probe_every = max(1, int(args.probe_every) // per_step)
    # Batches: a fixed random order of the stream's seq_len windows, the same for both sides.
    order = torch.randperm(steps * args.batch, generator=torch.Generator().manual_seed(0))
    results = {}
    for side in args.sides.split(","):
        cfg = ModelConfig(name=f"copy-{side}", vocab_size=tok.vocab_size, n_layers=args.layers,
                          d_model=args.d_model, n_heads=args.d_model // 32,
                          n_kv_heads=args.d_model // 32, head_dim=32, d_mlp=2 * args.d_model, max_seq_len=args.seq_len,
                          token_shift=side == "shift")
        torch.manual_seed(0)
        model = Transformer(cfg)
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=args.lr, betas=(0.9, 0.95))
        curve, start = [], time.time()
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = args.lr * min(1.0, (step + 1) / 100)
            idx = order[step * args.batch:(step + 1) * args.batch] * args.seq_len
            windows = torch.stack([stream[i:i + args.seq_len + 1] for i in idx.tolist()])
            model.train()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(windows[:, :-1], windows[:, 1:]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if (step + 1) % probe_every == 0 or step + 1 == steps:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    probe = copy_probe(model, spans, tok.bos_id)
                tokens = (step + 1) * per_step
                curve.append({"tokens": tokens, "loss": loss.item(), **probe,
                              "seconds": time.time() - start})
                print(f"{side:>5} {tokens / 1e6:6.1f}M tokens  train loss {loss.item():.3f}  "
                      f"copy {probe['first_copy_loss']:.3f} -> {probe['second_copy_loss']:.3f} "
                      f"(ratio {probe['ratio']:.3f})  {tokens / (time.time() - start):,.0f} tok/s",
                      flush=True)
        results[side] = {"config": cfg.to_dict(),
                         "gate_mean_abs": (model.shift.abs().mean().item()
                                           if model.shift is not None else None),
                         "curve": curve}
        (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'tokens':>8} " + " ".join(f"{s + ' ratio':>12}" for s in results))
    for rows in zip(*(r["curve"] for r in results.values())):
        print(f"{rows[0]['tokens'] / 1e6:7.1f}M " + " ".join(f"{r['ratio']:12.3f}" for r in rows))
    print(f"(held-out spans: {len(spans)} of {args.span} tokens; ratio = loss on the second copy "
          f"/ on the first; {math.log(tok.vocab_size):.2f} nats = uniform)")


if __name__ == "__main__":
    main()
