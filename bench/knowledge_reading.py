"""Does continual training teach a model to read memories, in which memory format, how fast?

The fact world of memory3.eval.facts (values nobody can guess, held-out facts only in the bank):
per setting, one tiny warmup, one bank, then the same continual run (same data, seed, steps).
Prints, per setting, the held-out fact loss without and with memory at every checkpoint, and the
median training step time relative to the first setting.

  --study format       the shipped memory format against one change at a time (issue 11)
  --study encode_grad  continual.encode_grad = none, kv and full, in the shipped format
  --study shape        the tiny shape against the mini shape's depth and width (issue 11)

    python bench/knowledge_reading.py --study format --out bench_runs/knowledge-format
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory3.config import Recipe  # noqa: E402
from memory3.data import Tokenizer, prepare_data, train_tokenizer  # noqa: E402
from memory3.eval.facts import FACT_DATA, fact_losses, write_facts  # noqa: E402
from memory3.eval.perplexity import trained_with_memory  # noqa: E402
from memory3.memory.bank import MemoryBank  # noqa: E402
from memory3.memory.build import build_bank  # noqa: E402
from memory3.train.checkpoint import load_model  # noqa: E402
from memory3.train.metrics import read_metrics  # noqa: E402
from memory3.train.trainer import train  # noqa: E402

# Each setting: overrides of the shipped defaults (model.* apply to warmup and bank too).
STUDIES = {
    "format": {
        "shipped": [],
        "all_layers": ["model.memory_layers=all"],
        "top_k_24": ["model.memory_top_k=24"],
        "chunk_16": ["model.chunk_len=16"],
        "5_from_previous": ["continual.new_per_chunk=5", "continual.previous_chunks=1"],
    },
    # Which part of the mini shape (4 layers, d_model 128) slows learning to read (issue 11).
    "shape": {
        "tiny": [],
        "tiny_4_layers": ["model.n_layers=4"],
        "wide_2_layers": ["model.d_model=128", "model.head_dim=32", "model.d_mlp=384"],
        "mini_shape": ["model.n_layers=4", "model.d_model=128", "model.head_dim=32",
                       "model.d_mlp=384"],
        "head_dim_32": ["model.head_dim=32"],
        "d_model_128": ["model.d_model=128", "model.d_mlp=384"],
    },
    "encode_grad": {mode: [f"continual.encode_grad={mode}"] for mode in ("none", "kv", "full")},
}


def run_setting(out: Path, data: dict, tok, overrides: list[str], args) -> dict:
    model_overrides = [o for o in overrides if o.startswith("model.")]
    common = [*FACT_DATA, "train.micro_batch_size=16", "train.eval_every=100000",
              f"optim.lr={args.lr}"]
    train(Recipe.from_name("tiny-warmup").override(
        [*common, *model_overrides, f"data.path={out.parent / 'shards_warm'}",
         f"train.max_steps={args.warmup_steps}"]), out / "warm", progress=False)
    build_bank(out / "warm", [data["knowledge"]], out / "bank", progress=False)
    bank = MemoryBank.open(out / "bank")
    run = out / "continual"
    train(Recipe.from_name("tiny-continual").override(
        [*common, *overrides, f"data.path={out.parent / 'shards_train'}",
         f"continual.bank={out / 'bank'}", f"train.init_from={out / 'warm'}",
         f"train.max_steps={args.steps}", f"train.save_every={args.every}", "train.keep_last=100",
         "schedule.warmup_steps=20"]), run, progress=False)
    curve = {}
    for ckpt in sorted((run / "checkpoints").glob("step-*")):
        model, recipe, info = load_model(ckpt)
        curve[str(info["step"])] = fact_losses(model, bank, tok, data["heldout"],  # as in JSON
                                               reads_sink=trained_with_memory(recipe))
    # Every step has the same tokens, so 1 / tokens_per_s is proportional to its time.
    times = [1 / m["tokens_per_s"] for m in read_metrics(run / "metrics.jsonl")
             if m["kind"] == "train"][5:]
    return {"overrides": overrides, "curve": curve, "median_step_time": statistics.median(times)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", choices=sorted(STUDIES), default="format")
    p.add_argument("--only", nargs="*", help="run only these settings of the study")
    p.add_argument("--out", default="bench_runs/knowledge")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--every", type=int, default=100, help="evaluate every this many steps")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--records", type=int, default=5, help="knowledge records per entity")
    args = p.parse_args(argv)
    out = Path(args.out)
    data = write_facts(out / "facts", records=args.records)
    if (out / "tok" / "tokenizer.model").exists():
        tok = Tokenizer(out / "tok")
    else:
        tok = train_tokenizer([data["train"], data["warm"], data["knowledge"]], out / "tok", 512,
                              progress=False)
    for split in ("warm", "train"):
        prepare_data([data[split]], tok.path, out / f"shards_{split}", valid_fraction=0.02,
                     progress=False)
    settings = {k: v for k, v in STUDIES[args.study].items() if not args.only or k in args.only}
    results_path = out / f"results-{args.study}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name, overrides in settings.items():
        if name not in results:
            results[name] = run_setting(out / f"{args.study}-{name}", data, tok, overrides, args)
            results_path.write_text(json.dumps(results, indent=1))
        print(name, json.dumps(results[name]["curve"]), flush=True)

    names = [n for n in settings if n in results]
    steps = sorted(results[names[0]]["curve"], key=int)
    print("held-out fact loss in nats, without / with memory (guessing: 3.69)")
    print(f"{'setting':<17}" + "".join(f"{'step ' + str(s):>16}" for s in steps)
          + f"{'step time':>12}")
    base = results[names[0]]["median_step_time"]
    for name in names:
        r = results[name]
        cells = "".join(f"{r['curve'][s]['none']:>8.2f} /{r['curve'][s]['memory']:>5.2f}"
                        for s in steps)
        print(f"{name:<17}{cells}{r['median_step_time'] / base:>11.2f}x")


if __name__ == "__main__":
    main()
