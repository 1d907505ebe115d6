"""How fast does continual training learn to read memories, per `continual.encode_grad`?

The fact world of memory3.eval.facts (values nobody can guess, held-out facts only in the bank):
one tiny warmup, one bank, then the same continual run (same data, seed, steps) with
encode_grad = none, kv and full. Prints, per setting, the held-out fact loss without and with
memory at every checkpoint, and the median training step time relative to `none`.

    python bench/knowledge_reading.py --out bench_runs/knowledge --steps 400
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
from memory3.eval.facts import FACT_CONTINUAL, FACT_MODEL, fact_losses, write_facts  # noqa: E402
from memory3.memory.bank import MemoryBank  # noqa: E402
from memory3.memory.build import build_bank  # noqa: E402
from memory3.train.checkpoint import load_model  # noqa: E402
from memory3.train.metrics import read_metrics  # noqa: E402
from memory3.train.trainer import train  # noqa: E402

MODES = ("none", "kv", "full")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_runs/knowledge")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=100, help="evaluate every this many steps")
    p.add_argument("--lr", type=float, default=5e-3)
    args = p.parse_args(argv)
    out = Path(args.out)
    data = write_facts(out / "facts")
    if (out / "tok" / "tokenizer.model").exists():
        tok = Tokenizer(out / "tok")
    else:
        tok = train_tokenizer([data["train"], data["warm"], data["knowledge"]], out / "tok", 512,
                              progress=False)
    for split in ("warm", "train"):
        prepare_data([data[split]], tok.path, out / f"shards_{split}", valid_fraction=0.02,
                     progress=False)
    common = [*FACT_MODEL, "train.micro_batch_size=16", "train.eval_every=100000",
              f"optim.lr={args.lr}"]
    train(Recipe.from_name("tiny-warmup").override(
        [*common, f"data.path={out / 'shards_warm'}", "train.max_steps=100"]), out / "warm",
        progress=False)
    build_bank(out / "warm", [data["knowledge"]], out / "bank", progress=False)
    bank = MemoryBank.open(out / "bank")

    results = {}
    for mode in MODES:
        run = out / f"continual-{mode}"
        train(Recipe.from_name("tiny-continual").override(
            [*common, *FACT_CONTINUAL, f"data.path={out / 'shards_train'}",
             f"continual.bank={out / 'bank'}", f"train.init_from={out / 'warm'}",
             f"continual.encode_grad={mode}", f"train.max_steps={args.steps}",
             f"train.save_every={args.every}", "train.keep_last=100",
             "schedule.warmup_steps=20"]), run, progress=False)
        curve = {}
        for ckpt in sorted((run / "checkpoints").glob("step-*")):
            model, _, info = load_model(ckpt)
            curve[info["step"]] = fact_losses(model, bank, tok, data["heldout"])
        # Every step has the same tokens, so 1 / tokens_per_s is proportional to its time.
        times = [1 / m["tokens_per_s"] for m in read_metrics(run / "metrics.jsonl")
                 if m["kind"] == "train"][5:]
        results[mode] = {"curve": curve, "median_step_time": statistics.median(times)}
    (out / "results.json").write_text(json.dumps(results, indent=1))

    steps = sorted(results["none"]["curve"])
    print("held-out fact loss in nats, without / with memory (guessing: 3.69)")
    print(f"{'encode_grad':<12}" + "".join(f"{'step ' + str(s):>16}" for s in steps)
          + f"{'step time vs none':>20}")
    base = results["none"]["median_step_time"]
    for mode in MODES:
        r = results[mode]
        cells = "".join(f"{r['curve'][s]['none']:>8.2f} /{r['curve'][s]['memory']:>5.2f}"
                        for s in steps)
        print(f"{mode:<12}{cells}{r['median_step_time'] / base:>19.2f}x")


if __name__ == "__main__":
    main()
