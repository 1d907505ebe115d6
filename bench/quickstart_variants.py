"""The quickstart's pipeline with one thing changed: does continual training learn to read?

Runs the stages of `memory3 quickstart` (world, tokenizer, shards, mini-warmup, bank, mini-continual,
held-out perplexity) with overrides of the model, the continual recipe and the generated world, and
prints held-out perplexity in modes none (the sink alone), memory and memory_own_chunk (references
retrieved with the text being predicted: the non-causal upper bound). Stages already done in --out
are reused, so variants of the continual phase share a warmup:

    python bench/quickstart_variants.py bench_runs/qsv --model d_model=64 d_mlp=256 \\
        --world '{"facts_per_record": 1}' --continual continual.new_per_chunk=5 \\
        continual.previous_chunks=1 --tag f1p5

--world takes keyword arguments of memory3.data.synthetic.make_world as JSON. A world whose
knowledge base differs needs its own --out (the bank is built once per folder); the warmup only
depends on the corpus, so its folder can be copied in.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory3.config import Recipe  # noqa: E402
from memory3.data import Tokenizer, prepare_data, train_tokenizer  # noqa: E402
from memory3.data.synthetic import make_world, write_world  # noqa: E402
from memory3.eval.perplexity import evaluate, text_sequences  # noqa: E402
from memory3.memory.bank import MemoryBank  # noqa: E402
from memory3.memory.build import build_bank  # noqa: E402
from memory3.quickstart import (CONTINUAL, EVAL_SEQUENCES, FRESH_ENTITIES,  # noqa: E402
                                SHEETS_PER_ENTITY, VOCAB_SIZE, WARMUP)
from memory3.train.checkpoint import load_model  # noqa: E402
from memory3.train.trainer import train  # noqa: E402

MODES = ("none", "memory", "memory_own_chunk")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--model", nargs="*", default=[], help="model fields: d_model=64 ...")
    p.add_argument("--warmup", nargs="*", default=[], help="overrides of the warmup recipe")
    p.add_argument("--continual", nargs="*", default=[], help="overrides of the continual recipe")
    p.add_argument("--world", default="{}", help="make_world keyword arguments (JSON)")
    p.add_argument("--tag", default="variant", help="name of this continual run")
    args = p.parse_args(argv)
    out, start = Path(args.out), time.time()
    world = {"seed": 0, "n_fresh": FRESH_ENTITIES, "sheets_per_entity": SHEETS_PER_ENTITY,
             **json.loads(args.world)}
    files = write_world(make_world(**world), out / "corpus")
    tok_dir = out / "tokenizer"
    tokenizer = (Tokenizer(tok_dir) if (tok_dir / "tokenizer.model").exists()
                 else train_tokenizer([files["corpus"], files["continual"]], tok_dir, VOCAB_SIZE,
                                      progress=False))
    for source, folder in ((files["corpus"], "data"), (files["continual"], "data_continual")):
        if not (out / folder / "manifest.json").exists():
            prepare_data([source], tokenizer.path, out / folder, valid_fraction=0.02,
                         progress=False)
    model = [f"model.{m}" for m in args.model]
    if not (out / "warmup" / "checkpoints" / "latest").exists():
        train(Recipe.from_name(WARMUP).override([f"data.path={out / 'data'}", *model,
                                                 *args.warmup]), out / "warmup", progress=False)
    if not (out / "bank" / "manifest.json").exists():
        build_bank(out / "warmup", [files["knowledge"]], out / "bank", embedder="hashing:4096",
                   progress=False)
    run = out / f"continual-{args.tag}"
    train(Recipe.from_name(CONTINUAL).override(
        [f"data.path={out / 'data_continual'}", f"continual.bank={out / 'bank'}",
         f"train.init_from={out / 'warmup'}", *model, *args.continual]), run, progress=False)
    net, recipe, _ = load_model(run)
    sequences = text_sequences([files["heldout"]], tokenizer, recipe.data.seq_len,
                               max_sequences=EVAL_SEQUENCES)
    results = evaluate(net, tokenizer, sequences, MODES, bank=MemoryBank.open(out / "bank"),
                       encode_now=True, reads_sink=True)
    ppl = {m: round(results[m]["perplexity"], 3) for m in MODES}
    summary = {"tag": args.tag, **ppl, "memory/none": round(ppl["memory"] / ppl["none"], 3),
               "own/none": round(ppl["memory_own_chunk"] / ppl["none"], 3),
               "seconds": round(time.time() - start)}
    (run / "variant.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
