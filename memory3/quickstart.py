"""`memory3 quickstart`: the whole pipeline end to end on the built-in corpus, on a CPU.

corpus -> tokenizer -> shards -> warmup -> memory bank -> continual training with memory ->
perplexity of held-out text in modes none / memory / rag -> a generation with provenance.

Warmup reads the corpus (known entities); continual training reads new text about fresh entities
that only the bank describes, so reading memory is what pays there (on the corpus it would not:
the warmup has memorised it). The held-out text is about other entities whose names and facts
appear in no training text, only in the knowledge base, so the gap between `none` and `memory`
is knowledge read from the bank.
Every file it writes goes under one folder; re-running resumes rather than redoing.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from memory3.config import Recipe
from memory3.data import Tokenizer, prepare_data, train_tokenizer
from memory3.data.synthetic import make_world, write_world
from memory3.train.checkpoint import load_model
from memory3.train.trainer import train

WARMUP, CONTINUAL = "mini-warmup", "mini-continual"
VOCAB_SIZE = 2048
FRESH_ENTITIES = 3000
SHEETS_PER_ENTITY = 3
EVAL_MODES = ("none", "memory", "rag")
EVAL_SEQUENCES = 32
STAGES = 8


def _stage(n: int, title: str):
    print(f"\n== {n}/{STAGES} {title}", flush=True)


def _prompt(heldout: Path) -> str:
    """The first two sentences of the first held-out document: about an entity only the bank
    knows, and long enough for the prompt's chunk to retrieve its fact sheet."""
    first = heldout.read_text().split("\n\n")[0].strip()
    return ". ".join(first.split(". ")[:2]) + "."


def quickstart(out: str | Path = "quickstart", steps: int | None = None,
               continual_steps: int | None = None) -> dict:
    from memory3.eval.perplexity import evaluate, text_sequences, trained_with_memory
    from memory3.generate import generate
    from memory3.memory.bank import MemoryBank
    from memory3.memory.build import build_bank

    out = Path(out)
    start = time.time()

    _stage(1, "corpus: a generated world of people, cities, rivers and their facts")
    files = write_world(make_world(seed=0, n_fresh=FRESH_ENTITIES,
                                  sheets_per_entity=SHEETS_PER_ENTITY), out / "corpus")
    print(f"wrote {', '.join(str(p) for p in files.values())}")

    _stage(2, "tokenizer: sentencepiece BPE")
    tok_dir = out / "tokenizer"
    # From the training text only, as in pretraining: a tokenizer that also learnt the knowledge
    # base would give held-out names tokens that no training text has, whose output rows only
    # ever learn to be unlikely (~15 nats each, at every mention, whatever memory says).
    tokenizer = (Tokenizer(tok_dir) if (tok_dir / "tokenizer.model").exists()
                 else train_tokenizer([files["corpus"], files["continual"]], tok_dir, VOCAB_SIZE,
                                      progress=False))
    print(f"{tokenizer.vocab_size} tokens in {tokenizer.path}")

    _stage(3, "token shards: the corpus (warmup) and the fresh entities' text (continual)")
    prepare_data([files["corpus"]], tokenizer.path, out / "data", valid_fraction=0.02)
    prepare_data([files["continual"]], tokenizer.path, out / "data_continual", valid_fraction=0.02)

    _stage(4, f"warmup pretraining without memory (recipe {WARMUP}, DeepSpeed on CPU)")
    data = f"data.path={out / 'data'}"
    recipe = Recipe.from_name(WARMUP).override(
        [data] + ([f"train.max_steps={steps}"] if steps else []))
    warmup = train(recipe, out / "warmup")

    _stage(5, "memory bank: the knowledge base encoded by the warmup model")
    # Lexical hashing with room for few collisions: a short prompt must still find its sheet.
    build_bank(out / "warmup", [files["knowledge"]], out / "bank", embedder="hashing:4096")

    _stage(6, f"continual training reading the bank (recipe {CONTINUAL})")
    recipe = Recipe.from_name(CONTINUAL).override(
        [f"data.path={out / 'data_continual'}", f"continual.bank={out / 'bank'}",
         f"train.init_from={out / 'warmup'}"]
        + ([f"train.max_steps={continual_steps}"] if continual_steps else []))
    continual = train(recipe, out / "continual")

    _stage(7, "perplexity of held-out text (facts only the bank holds) in modes "
              + ", ".join(EVAL_MODES))
    model, recipe, info = load_model(out / "continual")
    bank = MemoryBank.open(out / "bank", verify="size")
    sequences = text_sequences([files["heldout"]], tokenizer, recipe.data.seq_len,
                               max_sequences=EVAL_SEQUENCES)
    # The bank's memories were encoded by the warmup weights; continual training changed them.
    results = evaluate(model, tokenizer, sequences, EVAL_MODES, bank=bank, encode_now=True,
                       reads_sink=trained_with_memory(recipe), progress=True)
    (out / "eval.json").write_text(json.dumps(results, indent=1))

    _stage(8, "generation with memory: which references were read, chunk by chunk")
    prompt = _prompt(files["heldout"])
    gen = generate(model, tokenizer, prompt, bank=bank, max_new_tokens=96, encode_now=True)
    print(f"  {prompt!r} -> {gen.text!r}")
    for r in gen.retrievals:
        print(f"  chunk {r.chunk} (after {r.position} tokens) read: "
              + " | ".join(ref["text"][:60] for ref in r.references[:2]) + " ...")

    summary = {"warmup_val_ppl": warmup.get("val_ppl"), "continual_val_ppl": continual.get("val_ppl"),
               "continual_step": info["step"],
               **{f"heldout_ppl_{m}": results[m]["perplexity"] for m in EVAL_MODES}}
    print(f"\nheld-out perplexity: " + ", ".join(
        f"{m} {results[m]['perplexity']:.2f}" for m in EVAL_MODES)
        + f"  (eval.json)\ndone in {time.time() - start:.0f}s; everything is under {out}/")
    return summary
