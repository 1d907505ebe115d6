"""The former quickstart's pipeline with one thing changed: does continual training learn to read?

Runs the stages `memory3 quickstart` ran until 2026-12-03 (world, tokenizer, shards, mini-warmup, bank, mini-continual,
held-out perplexity) with overrides of the model, the continual recipe and the generated world, and
prints held-out perplexity in modes none (the sink alone), memory and memory_own_chunk (references
retrieved with the text being predicted: the non-causal upper bound). Stages already done in --out
are reused, so variants of the continual phase share a warmup:

    python bench/quickstart_variants.py bench_runs/qsv --model d_model=64 d_mlp=256 \\
        --world '{"facts_per_record": 1}' --continual continual.new_per_chunk=5 \\
        continual.previous_chunks=1 --tag f1p5

--world takes keyword arguments of memory3.data.synthetic.make_world as JSON. A world whose
knowledge base differs needs its own --out (the bank is built once per folder); the warmup only
depends on the corpus, so its folder can be copied in. --text rewrites how the held-out and
continual documents and the knowledge records are worded (experiments, not world options):
  intro N         N sentences naming the entity before its first fact (default 1)
  aside P         probability of an aside naming the entity after each fact (default 0.5)
  filler false    no everyday filler sentences in those documents
  heldout_once    one held-out document per entity, shuffled (the world writes two, adjacent,
                  so `none` can copy the second one's values from the first)
  records         "bare": sheets of values only ("Name kind v1 v2 ..."), sheets_per_entity
                  rotations; "sourced": one fact per record behind 3 source words
                  ("ledger census annals : Name label value"), which the evaluation filter keeps
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory3.config import Recipe  # noqa: E402
from memory3.data import Tokenizer, prepare_data, train_tokenizer  # noqa: E402
from memory3.data.synthetic import (ASIDES, INTROS, OUTROS, SCHEMA, World,  # noqa: E402
                                    _an, _cap, _filler, make_world, write_world)
from memory3.eval.perplexity import evaluate, text_sequences  # noqa: E402
from memory3.memory.bank import MemoryBank  # noqa: E402
from memory3.memory.build import build_bank  # noqa: E402
from memory3.train.checkpoint import load_model  # noqa: E402
from memory3.train.trainer import train  # noqa: E402

# The quickstart as it was until 2026-12-03 (the fact world of memory3.data.synthetic, the mini
# shape), which the RESULTS sections on the quickstart up to then measured.
WARMUP, CONTINUAL = "mini-warmup", "mini-continual"
VOCAB_SIZE = 2048
FRESH_ENTITIES = 3000
SHEETS_PER_ENTITY = 3
EVAL_SEQUENCES = 32
MODES = ("none", "memory", "memory_own_chunk")
SOURCES = "ledger census registry almanac chronicle gazette annals catalogue".split()


def variant_world(world: World, text: dict) -> World:
    """`world` with its documents and records worded as `text` says (see the module doc)."""
    if not text:
        return world
    unknown = set(text) - {"intro", "aside", "filler", "heldout_once", "records"}
    if unknown:
        raise SystemExit(f"--text: unknown keys {sorted(unknown)}")

    class Variant(World):
        def _profile(self, r, e, facts, n_filler):
            templates = {a: t.split("|") for a, _, _, t in SCHEMA[e.kind]}
            facts = list(facts)
            r.shuffle(facts)
            out = [r.choice(INTROS).format(s=e.name)]
            out += [a.format(s=e.name) for a in r.sample(ASIDES, text.get("intro", 1) - 1)]
            for f in facts:
                t = r.choice(templates[f.attribute])
                s = e.pronoun if t.startswith("{s}") and r.random() < 0.3 else e.name
                out.append(_an(_cap(t.format(s=s, v=f.value))))
                if r.random() < text.get("aside", 0.5):
                    out.append(r.choice(ASIDES).format(s=e.name))
            if text.get("filler", True):
                for _ in range(n_filler):
                    out.insert(r.randint(1, len(out)), _filler(r))
            out.append(r.choice(OUTROS))
            return " ".join(x for x in out if x)

        def heldout_documents(self):
            if not text.get("heldout_once"):
                return super().heldout_documents()
            r = random.Random(f"{self.seed}/heldout")
            docs = [self._profile(r, e, self.facts_of(e), n_filler=0)
                    for e in self.entities if e.heldout]
            r.shuffle(docs)
            return docs

        def knowledge_records(self):
            kind = text.get("records")
            if kind is None:
                return super().knowledge_records()
            rows = []
            for e in self.entities:
                r = random.Random(f"{self.seed}/records/{e.name}")
                facts = self.facts_of(e)
                labels = {a: lab.lower() for a, _, lab, _ in SCHEMA[e.kind]}
                if kind == "bare":
                    texts = [f"{e.name} {e.kind} " + " ".join(
                        f.value for f in facts[i % len(facts):] + facts[:i % len(facts)])
                        for i in range(self.sheets_per_entity)]
                elif kind == "sourced":
                    texts = [f"{' '.join(r.sample(SOURCES, 3))} : {e.name} "
                             f"{labels[f.attribute]} {f.value}" for f in facts]
                else:
                    raise SystemExit(f"--text records: 'bare' or 'sourced', not {kind!r}")
                rows += [{"id": f"{e.kind}-{e.name.lower().replace(' ', '-')}-{i}", "text": t}
                         for i, t in enumerate(texts)]
            return rows

    world.__class__ = Variant
    return world


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--model", nargs="*", default=[], help="model fields: d_model=64 ...")
    p.add_argument("--warmup", nargs="*", default=[], help="overrides of the warmup recipe")
    p.add_argument("--continual", nargs="*", default=[], help="overrides of the continual recipe")
    p.add_argument("--world", default="{}", help="make_world keyword arguments (JSON)")
    p.add_argument("--text", default="{}", help="document and record wording (JSON; see above)")
    p.add_argument("--tag", default="variant", help="name of this continual run")
    args = p.parse_args(argv)
    out, start = Path(args.out), time.time()
    world = {"seed": 0, "n_fresh": FRESH_ENTITIES, "sheets_per_entity": SHEETS_PER_ENTITY,
             **json.loads(args.world)}
    files = write_world(variant_world(make_world(**world), json.loads(args.text)),
                        out / "corpus")
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
