"""`memory3 quickstart`: the whole pipeline end to end on a built-in corpus, on a CPU.

corpus -> tokenizer -> shards -> warmup -> memory bank -> continual training with memory ->
perplexity of held-out text in modes none / memory / rag -> a generation with provenance.

The corpus is a registry of made-up people and their traits (memory3.data.traits): a person's
text states 32 traits, each one of 12 words, so without memory no model guesses a value better
than 1 in 12. Warmup reads people who are in no bank, each with their records in front of their
text, and learns to look values up in its context; continual training reads other people whose
records only the bank holds, and learns to read them from memory; the held-out people are in no
training text at all, only in the bank, so the gap between `none` and `memory` on them is
knowledge read from the bank.
Every file it writes goes under one folder; re-running resumes rather than redoing.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from memory3.config import Recipe
from memory3.data import Tokenizer, prepare_data, train_tokenizer
from memory3.data.traits import write_traits
from memory3.train.checkpoint import load_model
from memory3.train.trainer import train

WARMUP, CONTINUAL = "quickstart-warmup", "quickstart-continual"
VOCAB_SIZE = 2048
WORLD = dict(labelled=True, n_records=4)  # bench/RESULTS.md, traits_reading
# TF-IDF: a person's name outweighs the trait words every record shares; and references far
# below a chunk's best match are left unread, since they are other people's records of the same
# traits, whose values a reading model takes for the person's (bench/RESULTS.md, quickstart).
EMBEDDER = "lexical:2048"
MIN_RELATIVE_SCORE = 0.7
EVAL_MODES = ("none", "memory", "rag")
EVAL_SEQUENCES = 32
STAGES = 8


def _stage(n: int, title: str):
    print(f"\n== {n}/{STAGES} {title}", flush=True)


def _first_person(heldout: Path) -> tuple[str, str]:
    """A prompt (the first held-out person's text up to the third "Name has": long enough for
    its chunk to retrieve the person's records) and that person's whole text."""
    text = heldout.read_text().split("\n\n")[0].strip()
    third = [m.end() for m in re.finditer(r" has\b", text)][2]
    return text[:third], text


def _pairs(text: str) -> dict[str, str]:
    """'trait value' pairs of a person's text ("Name has t v t v ...")."""
    words = " ".join(s.split(" has ", 1)[1] for s in re.split(r"\.\s*", text)
                     if " has " in s).split()
    return dict(zip(words[::2], words[1::2]))


def quickstart(out: str | Path = "quickstart", steps: int | None = None,
               continual_steps: int | None = None) -> dict:
    from memory3.eval.perplexity import evaluate, text_sequences, trained_with_memory
    from memory3.generate import generate
    from memory3.memory.bank import MemoryBank
    from memory3.memory.build import build_bank

    out = Path(out)
    start = time.time()

    _stage(1, "corpus: a registry of made-up people and their 32 traits")
    files = write_traits(out / "corpus", **WORLD)
    print(f"wrote {', '.join(str(p) for p in files.values())}")

    _stage(2, "tokenizer: sentencepiece BPE")
    tok_dir = out / "tokenizer"
    # From the training text only, as in pretraining (the held-out people are in the bank only).
    tokenizer = (Tokenizer(tok_dir) if (tok_dir / "tokenizer.model").exists()
                 else train_tokenizer([files["warm"], files["train"]], tok_dir, VOCAB_SIZE,
                                      progress=False))
    print(f"{tokenizer.vocab_size} tokens in {tokenizer.path}")

    _stage(3, "token shards: warmup people (records in front) and continual people (text only)")
    prepare_data([files["warm"]], tokenizer.path, out / "data", valid_fraction=0.02)
    prepare_data([files["train"]], tokenizer.path, out / "data_continual", valid_fraction=0.02)

    _stage(4, f"warmup pretraining without memory (recipe {WARMUP}, DeepSpeed on CPU)")
    recipe = Recipe.from_name(WARMUP).override(
        [f"data.path={out / 'data'}"] + ([f"train.max_steps={steps}"] if steps else []))
    warmup = train(recipe, out / "warmup")

    _stage(5, "memory bank: the knowledge base encoded by the warmup model")
    build_bank(out / "warmup", [files["knowledge"]], out / "bank", embedder=EMBEDDER,
               min_relative_score=MIN_RELATIVE_SCORE)

    _stage(6, f"continual training reading the bank (recipe {CONTINUAL})")
    recipe = Recipe.from_name(CONTINUAL).override(
        [f"data.path={out / 'data_continual'}", f"continual.bank={out / 'bank'}",
         f"train.init_from={out / 'warmup'}"]
        + ([f"train.max_steps={continual_steps}"] if continual_steps else []))
    continual = train(recipe, out / "continual")

    _stage(7, "perplexity of held-out people (traits only the bank holds) in modes "
              + ", ".join(EVAL_MODES))
    model, recipe, info = load_model(out / "continual")
    bank = MemoryBank.open(out / "bank", verify="size")
    sequences = text_sequences([files["heldout"]], tokenizer, recipe.data.seq_len,
                               max_sequences=EVAL_SEQUENCES)
    # The bank's memories were encoded by the warmup weights; continual training changed them.
    results = evaluate(model, tokenizer, sequences, EVAL_MODES, bank=bank, encode_now=True,
                       reads_sink=trained_with_memory(recipe), progress=True)
    (out / "eval.json").write_text(json.dumps(results, indent=1))

    _stage(8, "generation: a held-out person's traits with memory (and without)")
    prompt, person = _first_person(files["heldout"])
    truth, told = _pairs(person), _pairs(prompt)
    correct = {}
    for mode in ("memory", "none"):
        gen = generate(model, tokenizer, prompt, bank=bank if mode == "memory" else None,
                       max_new_tokens=96, encode_now=True,
                       reads_sink=trained_with_memory(recipe))
        said = {t: v for t, v in _pairs(prompt + gen.text).items() if t not in told}
        correct[mode] = (sum(truth.get(t) == v for t, v in said.items()), len(said))
        if mode == "memory":
            print(f"  ...{prompt[-60:]!r} -> {gen.text!r}")
            for r in gen.retrievals:
                print(f"  chunk {r.chunk} (after {r.position} tokens) read: "
                      + " | ".join(ref["text"][-40:] for ref in r.references[:2]) + " ...")
    print("  traits it stated that are the person's: " + ", ".join(
        f"{m} {k} of {n}" for m, (k, n) in correct.items()) + " (1 in 12 by chance)")

    summary = {"warmup_val_ppl": warmup.get("val_ppl"), "continual_val_ppl": continual.get("val_ppl"),
               "continual_step": info["step"],
               **{f"heldout_ppl_{m}": results[m]["perplexity"] for m in EVAL_MODES},
               **{f"generated_traits_right_{m}": k for m, (k, _) in correct.items()}}
    ratio = results["memory"]["perplexity"] / results["none"]["perplexity"]
    print("\nheld-out perplexity: " + ", ".join(
        f"{m} {results[m]['perplexity']:.2f}" for m in EVAL_MODES)
        + f" (memory/none {ratio:.2f}; eval.json)\ndone in {time.time() - start:.0f}s; "
        f"everything is under {out}/")
    return summary
