"""Training throughput: our Transformer vs Hugging Face LlamaForCausalLM of the same shape.

    python bench/train_throughput.py                      # small preset, batch 4 x 512, bf16
    python bench/train_throughput.py --dtype fp32 --profile  # + top ops of one step of each

Both models hold the same weights (ours converted with memory3.model.hf), see the same batches,
run with the same threads and dtype, and are timed in one run with their steps interleaved
(A B B A A B ...: the order flips every pair) so machine noise hits both alike. One step of each =
zero_grad + forward with labels (HF's own loss on `labels=tokens`; ours on the shifted targets, so
both compute logits and loss for all T positions) + backward + AdamW step (same hyperparameters,
`foreach` implementation for both).

--dtype bf16 (default) keeps weights, activations and AdamW state in plain bf16 (no autocast, no fp32
master weights): the CPU then runs bf16 matmuls natively where it has them (AVX512-BF16 / AMX) and the
comparison measures the models rather than autocast's cast caching. Both models keep their RMSNorm in
fp32 internally and compute the loss in fp32. --dtype fp32 is everything fp32.

Needs transformers (a dev dependency). Prints a table with tokens/s of each and the ratio ours/HF.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory3.config import ModelConfig  # noqa: E402
from memory3.model import IGNORE_INDEX, Transformer  # noqa: E402
from memory3.model.hf import to_llama_config, to_llama_state_dict  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None, help="default: min(512, preset max_seq_len)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="HF attention")
    p.add_argument("--threads", type=int, default=None, help="default: torch's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile one step of each and print the top ops")
    return p.parse_args(argv)


def build(cfg: ModelConfig, dtype: torch.dtype, attn: str):
    from transformers import LlamaForCausalLM

    ours = Transformer(cfg)
    hf = LlamaForCausalLM(to_llama_config(cfg, attn_implementation=attn, use_cache=False))
    hf.load_state_dict({k: v.clone() for k, v in to_llama_state_dict(ours, cfg).items()},
                       strict=True)
    ours.to(dtype).train()
    hf.to(dtype).train()
    return ours, hf


def make_step(model, opt, ours: bool):
    def step(tokens: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        if ours:
            targets = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], IGNORE_INDEX)], 1)
            loss = model(tokens, targets).loss
        else:
            loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        opt.step()
        return loss.item()
    return step


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = ModelConfig.from_name(args.preset)
    T = args.seq_len or min(512, cfg.max_seq_len)
    dtype = DTYPES[args.dtype]
    ours, hf = build(cfg, dtype, args.attn)
    opt_kw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    steps = {"ours": make_step(ours, torch.optim.AdamW(ours.parameters(), **opt_kw), True),
             "hf": make_step(hf, torch.optim.AdamW(hf.parameters(), **opt_kw), False)}
    n = args.warmup + args.steps
    batches = torch.randint(0, cfg.vocab_size, (n, args.batch, T))

    # Same weights and batch: the first losses must agree (a wrong conversion would show here).
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    first_loss = {}
    for i in range(n):
        order = ("ours", "hf") if i % 2 == 0 else ("hf", "ours")
        for name in order:
            t0 = time.perf_counter()
            loss = steps[name](batches[i])
            dt = time.perf_counter() - t0
            first_loss.setdefault(name, loss)
            if i >= args.warmup:
                times[name].append(dt)

    tokens = args.batch * T
    print(f"# train_throughput: preset={cfg.name} ({cfg.n_params / 1e6:.1f}M params) batch={args.batch} "
          f"seq_len={T} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"steps={args.steps} warmup={args.warmup} hf_attn={args.attn}")
    print(f"# torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"# first-step loss: ours {first_loss['ours']:.4f}  hf {first_loss['hf']:.4f}")
    print(f"{'model':<8}{'median s/step':>15}{'min s/step':>12}{'tokens/s (median)':>20}")
    med = {}
    for name in ("ours", "hf"):
        med[name] = statistics.median(times[name])
        print(f"{name:<8}{med[name]:>15.4f}{min(times[name]):>12.4f}{tokens / med[name]:>20.0f}")
    # Two estimates of the same ratio: of the medians, and the median over step pairs (each pair
    # ran back to back, so a burst of machine load mostly cancels out of its ratio).
    paired = statistics.median(h / o for o, h in zip(times["ours"], times["hf"]))
    print(f"ratio ours/hf (tokens/s): {med['hf'] / med['ours']:.3f}x "
          f"(median of per-pair ratios: {paired:.3f}x)")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        for name in ("ours", "hf"):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steps[name](batches[0])
            print(f"\n## profile: {name}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
