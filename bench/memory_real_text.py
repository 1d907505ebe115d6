"""Does explicit memory pay on real text? A model, warmup then continual, with a real knowledge
base, evaluated on held-out text in modes none, memory and rag (issues 4 and 15, SPEC 1c).

Corpora (--corpus), each text nobody here wrote, each with held-out text that is nowhere in
training while a knowledge base holds related knowledge:
  dictionaries  WordNet 3.0 (dict-wn) held out, GCIDE (dict-gcide) defining the same words in the
                bank (SPEC 1c).     apt-get install -y dict-gcide dict-wn
  pydocs        Python's library reference (python3-doc) held out page by page, the standard
                library's docstrings in the bank (bench/pydocs.py).   apt-get install -y python3-doc
  pycode        the standard library's test files held out module by module, the modules'
                source in the bank (bench/pycode.py).
  pkgcode       files of installed packages held out, the packages' other files in the bank
                (repository-level completion; bench/pkgcode.py). The packages split as the
                cpu-warmup recipe's training code (bench/copy_emergence.py) splits them.
  own           yours: --train-text, --knowledge and --heldout (files or folders in any format
                `memory3 prepare-data` reads; --glob for folders of source files).

    python bench/memory_real_text.py --corpus dictionaries --out bench_runs/memory-dict
    python bench/memory_real_text.py --corpus pydocs --out bench_runs/memory-pydocs

A model that copies from its context, trained once (`memory3 train --recipe cpu-warmup`), can be
reused on every corpus: --warmup-run RUN skips stages 2-3 (its tokenizer tokenizes the corpus),
--continual-recipe cpu-continual trains the continual phase at its shape, and --continual-run RUN
evaluates a continual run trained elsewhere (e.g. on pkgcode) on another corpus:
    python bench/memory_real_text.py --corpus pkgcode --out bench_runs/memory-pkgcode \
        --warmup-run runs/cpu --continual-recipe cpu-continual --continual-steps 2000 \
        --memory-layers all --embedder lexical:4096

Stages (each skipped when its output exists, so a re-run continues where it stopped; the
training and bank stages also resume mid-way through the library's own resume):
 1. corpus     dictionaries: headwords are sampled (--universe of them, by a hash of the
               lower-cased word) so that both dictionaries' entries for a word come together and
               the run fits a CPU. GCIDE entries quoting WordNet 1.5 are dropped (they repeat
               WordNet glosses). WordNet entries whose headword has a GCIDE entry are split by a
               hash of the word into held-out, tune and the rest; entries sharing a gloss with a
               held-out or tune entry are dropped (WordNet repeats a synset's gloss under each of
               its words). The rest of both dictionaries, shuffled together, is both the training
               text and the knowledge base (one entry = one document; entries over 127 tokens
               make several references).
               pycode: a --universe of the stdlib modules with a test file; their test files
               (cut into documents of whole classes/functions) are split by a hash of the
               module into held-out, tune and the rest. The knowledge base is every module's
               source cut into functions and methods; the training text is the rest of the test
               files plus every module's source (--new-knowledge: plus the source of modules
               outside the universe instead, so that the bank's code is nowhere in training).
               pydocs: reference pages of modules written in Python are split by a hash of the
               page into held-out, tune and the rest; pages are cut into sections (documents,
               each led by its page's title). The knowledge base is the docstrings of every
               documented module (held-out ones included); the training text is the rest of the
               pages plus those docstrings.
               --copy-drills F adds runs of training words written twice (F of the training
               characters, training text only): a try at making induction form sooner.
 2. tokenizer  sentencepiece (vocab 8192, the `small` preset's) on the training text; its shards.
 3. warmup     `memory3 train` phase warmup, from scratch.
 4. bank       `memory3 build-bank` with the warmup checkpoint over the knowledge base.
 5. continual  `memory3 train` phase continual from the warmup weights, reading that bank
               (recipe small-continual: each chunk retrieves 1 reference, reads those of the 5
               chunks before it, encoded in real time; training overlap filter 0.9).
 6. eval bank  `memory3 build-bank` with the continual checkpoint (same knowledge base, same
               embedder), so `memory` mode reads memories stored in advance, as it would serve.
 7. eval       `memory3 eval` on the held-out text, modes none, memory, rag (causal retrieval,
               overlap filter 2/3), for the continual checkpoint (the headline) and the warmup
               one (what continual training changed).
 8. retrieval  for the same held-out sequences and the same retrieval call as `memory` mode: the
               fraction of chunks whose retrieved references are about a subject of that chunk
               (a headword; a module), so a miss can be told apart: retrieval or reading.
 9. oracle     the ceiling of knowledge read as text: held-out documents alone, after the
               knowledge on their subject (chosen by hand, not retrieved), after random knowledge.
10. copying    can the model use earlier text at all: the copy probe (memory3.eval.copying) on
               held-out spans, loss on the second copy / the first (1: no in-context copying).
11. decoding   generation speed from held-out prompts with no bank, memory and rag.
Writes OUT/results-<slice><tag>.json (OUT/results.json for the default run) and prints a table.
--slice tune evaluates the tune slice instead (for choosing settings without looking at held-out
numbers); --tag=-NAME runs another continual setting next to the first, e.g.
    python bench/memory_real_text.py --out bench_runs/memory-dict --tag=-c400 \
        --continual-steps 400
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import pkgcode  # noqa: E402
from jobs import bank_complete, last_step, run_memory3 as memory3  # noqa: E402
import pycode  # noqa: E402
import pydocs  # noqa: E402
from dictionaries import bucket, glosses, headword, quotes_wordnet, read_dictd  # noqa: E402

SPLIT_SEED = "memory-dict"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", choices=("dictionaries", "pydocs", "pycode", "pkgcode", "own"),
                   default="dictionaries")
    p.add_argument("--train-text", nargs="+", default=[],
                   help="own: files or folders of training text for the continual phase (and "
                        "the warmup, unless --warmup-run); any format `memory3 prepare-data` reads")
    p.add_argument("--knowledge", nargs="+", default=[],
                   help="own: the knowledge base (files or folders, as --train-text)")
    p.add_argument("--heldout", nargs="+", default=[],
                   help="own: held-out text, in neither the training text nor the knowledge base")
    p.add_argument("--glob", action="append",
                   help="own: read the files of folders whose names match (e.g. '*.py'), each "
                        "whole as one document (see memory3 prepare-data --glob)")
    p.add_argument("--warmup-run",
                   help="a finished warmup run (e.g. `memory3 train --recipe cpu-warmup`) to "
                        "start from, with its tokenizer, instead of training one on the corpus")
    p.add_argument("--continual-run",
                   help="a finished continual run to evaluate instead of training one (its "
                        "tokenizer must be the warmup's)")
    p.add_argument("--out", default="bench_runs/memory-dict")
    # One thread: on this shared 2-core machine a 2-thread step waits at every OpenMP barrier for
    # a descheduled partner; a small-preset forward+backward measured 3 s with 1 thread vs
    # 13-23 s with 2 under a load average of ~7.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--universe", type=float,
                   help="dictionaries: fraction of headwords (both dictionaries) the run uses "
                        "(default 0.012); pycode: fraction of tested modules (default 0.4)")
    p.add_argument("--heldout-fraction", type=float,
                   help="dictionaries: of the WordNet entries whose headword GCIDE defines too "
                        "(default 0.4); pydocs: of the pages of modules written in Python "
                        "(default 0.1); pycode: of the modules (default 0.15)")
    p.add_argument("--tune-fraction", type=float,
                   help="as --heldout-fraction (default 0.1 and 0.05)")
    p.add_argument("--new-knowledge", action="store_true",
                   help="pycode: keep the knowledge base out of the training text (the bank holds "
                        "source the weights never saw, as a bank grown after training would); "
                        "the training text gets the source of modules outside --universe instead")
    p.add_argument("--bank-files", type=float, default=0.0,
                   help="pkgcode: this fraction of each training package's files goes to the "
                        "bank only and the rest to the continual text only (default 0: every "
                        "training file is in both, so a training chunk's bank holds the rest of "
                        "its own file, which evaluation never offers)")
    p.add_argument("--copy-drills", type=float, default=0.0,
                   help="add this fraction (of the training characters) of copy drills to the "
                        "training text: runs of its words repeated twice, which teach a small "
                        "model to use earlier text (induction) far sooner than the text alone")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--warmup-steps", type=int, default=250)
    p.add_argument("--warmup-lr", type=float, default=2e-3)
    p.add_argument("--continual-recipe", default="small-continual")
    p.add_argument("--continual-steps", type=int, default=80)
    p.add_argument("--continual-lr", type=float, default=1e-3)
    p.add_argument("--memory-layers", default="first_half",
                   help="model.memory_layers for the whole run (it is part of the model config)")
    p.add_argument("--memory-top-k", type=int,
                   help="model.memory_top_k of the continual run and its banks (default: the "
                        "continual recipe's)")
    p.add_argument("--continual-set", nargs="+", default=[], metavar="SECTION.FIELD=VALUE",
                   help="further overrides of the continual recipe, e.g. "
                        "continual.own_chunk_share=0.5 continual.own_chunk_overlap=1.0")
    p.add_argument("--embedder", default="hashing:4096",
                   help="retrieval embedder of the banks (see memory3 build-bank --embedder)")
    p.add_argument("--eval-bank", choices=("continual", "warmup"), default="continual",
                   help="continual: build a bank with the continual weights for evaluation; "
                        "warmup: evaluate with the warmup bank, `memory3 eval` then encodes the "
                        "retrieved references as it reads them (memory mode's time includes that)")
    p.add_argument("--eval-sequences", type=int, default=32)
    p.add_argument("--eval-context", type=int, default=0, metavar="N",
                   help="memory3 eval --context N: sliding windows, each sequence's first N "
                        "tokens context only (N = 64: only tokens whose chunk reads memory are "
                        "scored); its results go to their own files")
    p.add_argument("--modes", default="none,memory,rag",
                   help="modes evaluated for the continual checkpoint (none, memory and rag are "
                        "needed; memory_own_chunk adds the non-causal upper bound)")
    p.add_argument("--warmup-modes", default="none,memory",
                   help="modes evaluated for the warmup checkpoint (rag is slow: one forward "
                        "per chunk)")
    p.add_argument("--slice", choices=("heldout", "tune"), default="heldout",
                   help="which held-out slice stage 7-8 evaluate")
    p.add_argument("--tag", default="",
                   help="suffix of the continual run, its bank and its results (for trying "
                        "another continual setting next to the first)")
    return p.parse_args(argv)


# -- 1. corpus -----------------------------------------------------------------------------------
FILES = ("train", "kb", "tune", "heldout")


def build_corpus(out: Path, args) -> dict[str, Path]:
    """Writes OUT/{train,kb,tune,heldout}.jsonl (documents {"text", "head": their subject}) and
    OUT/corpus.json (counts)."""
    files = {n: out / f"{n}.jsonl" for n in FILES}
    if all(f.exists() for f in files.values()):
        return files
    if args.new_knowledge and args.corpus != "pycode":
        sys.exit("--new-knowledge is for --corpus pycode")
    rows, stats = {"dictionaries": dictionary_rows, "pydocs": pydocs_rows,
                   "pycode": pycode_rows, "pkgcode": pkgcode_rows,
                   "own": own_rows}[args.corpus](args)
    if args.copy_drills:
        rows["train"] = copy_drills(rows["train"], args.copy_drills)
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in rows.items():
        tmp = files[name].with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(d) + "\n" for d in docs))
        tmp.replace(files[name])
    stats |= {f"{name}_documents": len(docs) for name, docs in rows.items()}
    stats |= {f"{name}_chars": sum(len(d["text"]) for d in docs) for name, docs in rows.items()}
    (out / "corpus.json").write_text(json.dumps(stats, indent=1) + "\n")
    return files


def copy_drills(train: list[dict], fraction: float) -> list[dict]:
    """train plus drills: 20-60 words drawn from train's own words, written twice, as documents
    making up `fraction` of the characters, mixed in by hash. Nothing in them is knowledge."""
    import random
    import re
    rng = random.Random(0)
    words = sorted({w for d in train for w in re.findall(r"\w+", d["text"])})
    budget = fraction * sum(len(d["text"]) for d in train)
    drills = []
    while budget > 0:
        run = " ".join(rng.choices(words, k=rng.randint(20, 60)))
        drills.append({"text": f"{run}\n{run}", "head": "", "drill": True})
        budget -= len(drills[-1]["text"])
    return sorted(train + drills, key=lambda d: bucket(d["text"], "copy-drills-order"))


def dictionary_rows(args) -> tuple[dict[str, list[dict]], dict]:
    heldout_fraction = 0.4 if args.heldout_fraction is None else args.heldout_fraction
    tune_fraction = 0.1 if args.tune_fraction is None else args.tune_fraction
    universe = 0.012 if args.universe is None else args.universe
    in_universe = lambda head: bucket(headword(head), f"{SPLIT_SEED}-universe") < universe
    wordnet = [(h, t) for h, t in read_dictd("wn") if in_universe(h)]
    gcide = [(h, t) for h, t in read_dictd("gcide") if in_universe(h) and not quotes_wordnet(t)]
    defined_by_gcide = {headword(h) for h, _ in gcide}
    heldout, tune, rest = [], [], []
    for h, t in wordnet:
        u = bucket(headword(h), f"{SPLIT_SEED}-split")
        if headword(h) in defined_by_gcide and u < heldout_fraction:
            heldout.append((h, t))
        elif headword(h) in defined_by_gcide and u < heldout_fraction + tune_fraction:
            tune.append((h, t))
        else:
            rest.append(("wn", h, t))
    unseen = set().union(*(glosses(t) for _, t in heldout + tune))
    kept = [e for e in rest if not glosses(e[2]) & unseen]
    dropped = len(rest) - len(kept)
    kept += [("gcide", h, t) for h, t in gcide]
    kept.sort(key=lambda e: bucket(e[2], f"{SPLIT_SEED}-order"))
    train = [{"text": t, "head": headword(h), "dict": d} for d, h, t in kept]
    rows = {"train": train, "kb": train,
            "tune": [{"text": t, "head": headword(h), "dict": "wn"} for h, t in tune],
            "heldout": [{"text": t, "head": headword(h), "dict": "wn"} for h, t in heldout]}
    return rows, {"wordnet_entries": len(wordnet), "gcide_entries": len(gcide),
                  "dropped_sharing_a_gloss": dropped}


def pydocs_rows(args) -> tuple[dict[str, list[dict]], dict]:
    heldout_fraction = 0.1 if args.heldout_fraction is None else args.heldout_fraction
    tune_fraction = 0.05 if args.tune_fraction is None else args.tune_fraction
    seed = "memory-pydocs"
    pages = pydocs.read_pages()
    rows: dict[str, list[dict]] = {n: [] for n in FILES}
    for name, modules, text in pages:
        head = modules[0] if modules else name
        u = bucket(name, f"{seed}-split")
        in_python = any(pydocs.module_source(m) for m in modules)
        slice_ = ("heldout" if in_python and u < heldout_fraction else
                  "tune" if in_python and u < heldout_fraction + tune_fraction else "train")
        rows[slice_] += [{"text": t, "head": head, "page": name} for t in pydocs.sections(text)]
    documented = sorted({m for _, modules, _ in pages for m in modules})
    rows["kb"] = [{"text": t, "head": m, "page": "docstring"}
                  for m in documented for t in pydocs.docstrings(m)]
    rows["train"] += rows["kb"]
    for name in FILES:  # documents of one page or module would otherwise come together
        rows[name].sort(key=lambda d: bucket(d["text"], f"{seed}-order"))
    return rows, {"pages": len(pages), "documented_modules": len(documented),
                  "heldout_pages": len({d["page"] for d in rows["heldout"]}),
                  "tune_pages": len({d["page"] for d in rows["tune"]})}


def pycode_rows(args) -> tuple[dict[str, list[dict]], dict]:
    universe = 0.4 if args.universe is None else args.universe
    heldout_fraction = 0.15 if args.heldout_fraction is None else args.heldout_fraction
    tune_fraction = 0.05 if args.tune_fraction is None else args.tune_fraction
    seed = "memory-pycode"
    every = pycode.tested_modules()
    modules = [m for m in every if bucket(m[0], f"{seed}-universe") < universe]
    rows: dict[str, list[dict]] = {n: [] for n in FILES}
    if args.new_knowledge:  # general Python for the weights, none of it in the bank
        chosen = {m[0] for m in modules}
        rows["train"] += [{"text": t, "head": name, "file": path.name}
                          for name, sources, _ in every if name not in chosen
                          for path in sources for t in pycode.file_documents(path)]
    for name, sources, test in modules:
        u = bucket(name, f"{seed}-split")
        slice_ = ("heldout" if u < heldout_fraction else
                  "tune" if u < heldout_fraction + tune_fraction else "train")
        rows[slice_] += [{"text": t, "head": name, "file": test.name}
                         for t in pycode.file_documents(test)]
        for path in sources:
            rows["kb"] += [{"text": t, "head": name, "file": path.name}
                           for t in pycode.definitions(path)]
            if not args.new_knowledge:
                rows["train"] += [{"text": t, "head": name, "file": path.name}
                                  for t in pycode.file_documents(path)]
    for name in FILES:
        rows[name].sort(key=lambda d: bucket(d["text"], f"{seed}-order"))
    return rows, {"modules": len(modules),
                  "heldout_modules": len({d["head"] for d in rows["heldout"]}),
                  "tune_modules": len({d["head"] for d in rows["tune"]})}


def pkgcode_rows(args) -> tuple[dict[str, list[dict]], dict]:
    return pkgcode.rows(train_chars=int(10_000_000 / (1 - args.bank_files)),
                        heldout_package_chars=8_000_000, bank_files=args.bank_files,
                        heldout_fraction=(0.15 if args.heldout_fraction is None
                                          else args.heldout_fraction),
                        tune_fraction=0.05 if args.tune_fraction is None else args.tune_fraction)


def own_rows(args) -> tuple[dict[str, list[dict]], dict]:
    """A user's corpus as given: no subjects ("head" empty), so the text oracle picks, of the
    whole knowledge base, the reference sharing most tokens with each held-out document."""
    from memory3.data.text import iter_documents
    given = {"train": args.train_text, "kb": args.knowledge, "heldout": args.heldout}
    flags = {"train": "--train-text", "kb": "--knowledge", "heldout": "--heldout"}
    if not all(given.values()):
        sys.exit(f"--corpus own needs {', '.join(flags[n] for n, v in given.items() if not v)}")
    rows = {name: [{"text": d.text, "head": "", "file": d.source}
                   for d in iter_documents(paths, glob=args.glob)]
            for name, paths in given.items()}
    rows["tune"] = []
    return rows, {"sources": {name: [str(p) for p in paths] for name, paths in given.items()}}


# -- helpers: the CLI is the pipeline under test -----------------------------------------------
# The tokenizer every stage reads: the one the corpus's shards name (set by main). A --warmup-run
# may record a data.path relative to wherever it was launched, where its own would not be found.
TOKENIZER: str | None = None


def metrics_summary(run: Path) -> dict:
    """First and last training losses (mean of 10 steps), last validation loss, median tok/s."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    losses = [r["loss"] for r in train]
    return {"steps": train[-1]["step"], "loss_first10": float(np.mean(losses[:10])),
            "loss_last10": float(np.mean(losses[-10:])),
            "tokens_per_s_median": float(np.median([r["tokens_per_s"] for r in train])),
            "val": [{"step": r["step"], "val_loss": r["val_loss"]} for r in evals]}


# -- 8. retrieval ------------------------------------------------------------------------------
def retrieval_hits(checkpoint: Path, bank_dir: Path, data: Path, kb: Path, seq_len: int,
                   max_sequences: int) -> dict:
    """Fraction of chunks (that read memories) whose retrieved references are about the subject
    (a headword, a module: field "head") of a document in the chunk, with the exact retrieval
    `memory3 eval` does in `memory` mode, with each query rule, and, as an upper bound, with the
    chunk's own query."""
    import torch

    from memory3.eval.perplexity import text_sequences
    from memory3.memory.bank import MemoryBank
    from memory3.memory.overlap import EVAL_OVERLAP
    from memory3.memory.reading import retrieve_for_chunks
    from memory3.train.checkpoint import load_model, load_tokenizer

    _, recipe, _ = load_model(checkpoint)
    tok = load_tokenizer(checkpoint, TOKENIZER)
    cfg = recipe.model
    seqs = text_sequences([data], tok, seq_len, max_sequences=max_sequences)
    docs = [json.loads(line) for line in data.read_text().splitlines()]
    # The same stream text_sequences builds ([BOS] doc [EOS] ...), with the entry of each token.
    owner: list[int] = []
    stream: list[int] = []
    for i, d in enumerate(docs):
        ids = [tok.bos_id, *tok.encode(d["text"]), tok.eos_id]
        owner += [i] * len(ids)
        stream += ids
        if len(owner) >= seqs.numel():
            break
    if stream[:seqs.numel()] != seqs.flatten().tolist():
        raise RuntimeError("held-out token stream differs from memory3's text_sequences: the "
                           "headword of each position would be wrong")
    owner_rows = torch.tensor(owner[:seqs.numel()]).view(seqs.shape)[:, :-1]
    kb_heads = [json.loads(line)["head"] for line in kb.read_text().splitlines()]
    bank = MemoryBank.open(bank_dir, verify="size")
    x = seqs[:, :-1]
    L = cfg.chunk_len
    out = {}
    # causal: the model's own rule (model.retrieval_query), as `memory3 eval` reads; then each
    # rule by name, to compare
    for name, own, query in (("causal", False, cfg.retrieval_query),
                             ("causal_chunk", False, "chunk"),
                             ("causal_document", False, "document"),
                             ("own_chunk", True, cfg.retrieval_query)):
        rows = retrieve_for_chunks(bank, tok, x, chunk_len=L, k=cfg.memories_per_chunk,
                                   overlap_threshold=EVAL_OVERLAP, own_chunk=own, query=query)
        flat = np.unique(rows[rows >= 0])
        head_of = {int(r): kb_heads[int(rec.doc_id.rsplit("#", 1)[1])]
                   for r, rec in zip(flat, bank.references(flat))}
        hits = chunks = refs = same = 0
        for b in range(rows.shape[0]):
            for c in range(rows.shape[1]):
                got = [int(r) for r in rows[b, c] if r >= 0]
                if not got:
                    continue
                heads = {docs[i]["head"] for i in owner_rows[b, c * L:(c + 1) * L].tolist()}
                found = [head_of[r] in heads for r in got]
                chunks += 1
                hits += any(found)
                refs += len(got)
                same += sum(found)
        out[name] = {"chunks_reading_memories": chunks, "hit_rate": hits / max(chunks, 1),
                     "references_per_chunk": refs / max(chunks, 1),
                     "same_subject_reference_fraction": same / max(refs, 1)}
    bank.close()
    return out


# -- 9. text oracle ----------------------------------------------------------------------------
def text_oracle(checkpoint: Path, data: Path, kb: Path, seq_len: int, n_docs: int = 150) -> dict:
    """What well-chosen knowledge could give, read as text: perplexity of held-out documents
    alone, after the knowledge-base document on their subject (the other dictionary's entry for
    the word; of the module's docstrings, the one sharing most words with the document, unless it
    overlaps it beyond the evaluation's 2/3) as a preceding [BOS] ref [EOS] document, and after a
    random knowledge-base document (the control: any preceding text helps a little). Each split
    too by where the predicted token sits: within the document's first chunk_len tokens
    ("_head": causal retrieval has no text of the document to query with there) or after them
    ("_rest": what memory retrieved by the document's head could at best give, read as text).

    For a model trained with memory (which then reads its sink in every forward, as `memory3
    eval` scores it) the same reference also as the memory every chunk reads, encoded now:
    "memory" (the model's memory_top_k), "memory_dense" (every token kept: reading as such, no
    selection) and "memory_causal" (from the document's second chunk on: a perfect causal chunk
    retriever). memory vs subject separates reading from retrieval; memory_causal vs memory is
    what chunk-level causality costs."""
    import math
    import random

    import torch
    import torch.nn.functional as F

    from memory3.eval.copying import own_memories
    from memory3.eval.perplexity import trained_with_memory
    from memory3.memory.encoder import MemoryEncoder
    from memory3.memory.overlap import EVAL_OVERLAP, exceeding
    from memory3.memory.reading import sink_only
    from memory3.model import ChunkMemories
    from memory3.train.checkpoint import load_model, load_tokenizer
    model, recipe, _ = load_model(checkpoint)
    model.eval()
    tok = load_tokenizer(checkpoint, TOKENIZER)
    ref_len = recipe.model.reference_len
    reads = trained_with_memory(recipe)
    sparse = MemoryEncoder(model) if reads else None
    dense = MemoryEncoder(model, top_k=ref_len - 1) if reads else None
    sink = sparse.sink_kv() if reads else None
    knowledge = [json.loads(line) for line in kb.read_text().splitlines()]
    on: dict[str, list[list[int]]] = {}
    for d in knowledge:
        on.setdefault(d["head"], []).append(tok.encode(d["text"])[:ref_len - 1])
    rng = random.Random(0)
    L = recipe.model.chunk_len
    names = ("alone", "subject", "random",
             *(("memory", "memory_dense", "memory_causal") if reads else ()))
    parts = ("", "_head", "_rest")
    nll = {name + part: 0.0 for name in names for part in parts}
    tokens = head = docs = 0

    @torch.no_grad()
    def losses(x: torch.Tensor, skip: int, memory=None) -> torch.Tensor:
        if memory is None and sink is not None:
            memory = sink_only(sink, x[:, :-1], model.cfg)
        logits = model(x[:, :-1], memory=memory).logits[0, skip:]
        return F.cross_entropy(logits.float(), x[0, skip + 1:], reduction="none")

    for d in map(json.loads, data.read_text().splitlines()):
        doc = [tok.bos_id, *tok.encode(d["text"]), tok.eos_id][:seq_len - ref_len - 1]
        subject = on.get(d["head"], [])
        fair = [r for r, copy in zip(subject, exceeding(subject, doc, EVAL_OVERLAP)) if not copy]
        if not fair:
            continue
        best = max(fair, key=lambda r: len(set(r) & set(doc)))
        x = torch.tensor([doc])
        per_token = {}
        for name, ref in (("alone", None), ("subject", best),
                          ("random", tok.encode(rng.choice(knowledge)["text"])[:ref_len - 1])):
            before = [] if ref is None else [tok.bos_id, *ref, tok.eos_id]
            per_token[name] = losses(torch.tensor([before + doc]), len(before))
        if reads:
            C = -(-(len(doc) - 1) // L)
            memory = own_memories(sparse, [best], C, sink)
            per_token["memory"] = losses(x, 0, memory)
            per_token["memory_dense"] = losses(x, 0, own_memories(dense, [best], C, sink))
            late = memory.valid.clone()  # the same memory, read from the second chunk on
            late[:, 0] = False
            per_token["memory_causal"] = losses(x, 0, ChunkMemories(memory.kv, late, sink))
        for name, loss in per_token.items():
            nll[name] += loss.sum().item()
            nll[f"{name}_head"] += loss[:L - 1].sum().item()  # doc[1 : L]
            nll[f"{name}_rest"] += loss[L - 1:].sum().item()
        tokens += len(doc) - 1
        head += min(len(doc), L) - 1
        docs += 1
        if docs == n_docs:
            break
    count = dict(zip(parts, (tokens, head, tokens - head)))
    return {"documents": docs, "tokens": tokens, "tokens_head": head,
            **{f"perplexity_{name}{part}": math.exp(nll[name + part] / max(count[part], 1))
               for name in names for part in parts}}


# -- 10. copying ------------------------------------------------------------------------------
def copy_test(checkpoint: Path, data: Path, continual: Path, length: int = 100,
              spans: int = 64) -> dict:
    """Can the model use earlier text at all (in-context copying, what reading retrieved text or
    memories builds on): memory3's copy probe on the first `length` tokens of held-out
    documents, each fed twice; loss on the second copy / on the first. And through memory
    (`through_memory`): each span read as its own memory, at the continual run's memory layers
    and top_k ("sparse") and keeping every token ("dense"): where the read path loses what the
    text held."""
    import dataclasses

    from memory3.checkpoints import model_config
    from memory3.eval.copying import copy_probe, document_spans, memory_copy_probe
    from memory3.train.checkpoint import load_model, load_tokenizer
    model, _, _ = load_model(checkpoint)
    tok = load_tokenizer(checkpoint, TOKENIZER)
    found = document_spans((tok.encode(json.loads(line)["text"])
                            for line in data.read_text().splitlines()), length, spans)
    if not found:
        raise SystemExit(f"copying: no document of {data} has {length} tokens")
    reads = model_config(continual)
    model.cfg = dataclasses.replace(model.cfg, memory_layers=reads.memory_layers,
                                    memory_top_k=reads.memory_top_k)
    through = {name: memory_copy_probe(model, found, tok.bos_id, top_k=k)
               for name, k in (("sparse", None), ("dense", reads.reference_len - 1))}
    return {**copy_probe(model, found, tok.bos_id), "through_memory": through}


# -- 11. decoding -----------------------------------------------------------------------------
def decode_speed(checkpoint: Path, bank_dir: Path, data: Path, prompt_tokens: int = 64,
                 prompts: int = 4, reps: int = 3) -> dict:
    """Generation tokens/s (greedy, to the model's max_seq_len) from held-out prompts, with no
    bank, with memory and with rag (memory3.generate, as `memory3 generate` serves), the three
    interleaved in an order that flips every repetition; the median over prompts x reps."""
    import statistics

    from memory3.generate import generate
    from memory3.memory.bank import MemoryBank
    from memory3.train.checkpoint import load_model, load_tokenizer
    model, recipe, _ = load_model(checkpoint)
    tok = load_tokenizer(checkpoint, TOKENIZER)
    bank = MemoryBank.open(bank_dir, verify="size")
    texts = [tok.decode(ids[:prompt_tokens - 1]) for ids in
             (tok.encode(json.loads(line)["text"]) for line in data.read_text().splitlines())
             if len(ids) >= prompt_tokens][:prompts]
    new = recipe.model.max_seq_len - prompt_tokens
    sides = ("none", "memory", "rag")
    speed: dict[str, list[float]] = {side: [] for side in sides}
    for i in range(reps):
        for text in texts:
            for side in sides if i % 2 == 0 else sides[::-1]:
                start = time.perf_counter()
                out = generate(model, tok, text, bank=None if side == "none" else bank,
                               mode="rag" if side == "rag" else "memory", max_new_tokens=new,
                               stop_at_eos=False, reads_sink=side == "none")
                speed[side].append((len(out.tokens) - len(tok.encode(text)) - 1)
                                   / (time.perf_counter() - start))
    bank.close()
    result = {side: statistics.median(v) for side, v in speed.items()}
    return {"tokens_per_s": result, "prompts": len(texts), "reps": reps,
            "prompt_tokens": prompt_tokens, "new_tokens": new,
            "memory_vs_rag": result["memory"] / result["rag"],
            "memory_vs_none": result["memory"] / result["none"]}


# -- main ----------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    stage_seconds: dict[str, float] = {}

    def stage(name: str, done: bool, fn):
        if done:
            print(f"[{name}] done before, skipped", flush=True)
            return None
        start = time.perf_counter()
        value = fn()
        stage_seconds[name] = round(time.perf_counter() - start, 1)
        print(f"[{name}] {stage_seconds[name]:.0f} s", flush=True)
        return value

    files = {n: out / f"{n}.jsonl" for n in FILES}
    stage("corpus", all(f.exists() for f in files.values()), lambda: build_corpus(out, args))
    print(json.loads((out / "corpus.json").read_text()), flush=True)

    tok_dir, shards = out / "tokenizer", out / "shards"
    warmup = Path(args.warmup_run).resolve() if args.warmup_run else out / "warmup"

    def tokenize():
        from memory3.checkpoints import load_tokenizer
        from memory3.data import prepare_data, train_tokenizer
        if args.warmup_run:  # its vocabulary is in its weights
            tokenizer = load_tokenizer(warmup).path
        else:
            if not (tok_dir / "tokenizer.model").exists():
                train_tokenizer([files["train"]], tok_dir, 8192, progress=False)
            tokenizer = tok_dir
        prepare_data([files["train"]], tokenizer, shards, valid_fraction=0.01, progress=False)
    stage("tokenizer+shards", (shards / "manifest.json").exists(), tokenize)

    common = [f"data.path={shards}", f"data.seq_len={args.seq_len}",
              f"model.memory_layers={args.memory_layers}",
              f"train.micro_batch_size={args.micro_batch}", "train.grad_accum=1"]
    stage("warmup", bool(args.warmup_run) or last_step(warmup) >= args.warmup_steps, lambda: memory3(
        ["train", "--recipe", "small-warmup", "--out", str(warmup), "--no-progress", *common,
         f"train.max_steps={args.warmup_steps}", f"optim.lr={args.warmup_lr}",
         f"optim.min_lr={args.warmup_lr / 10}", "schedule.warmup_steps=50",
         f"train.eval_every={max(args.warmup_steps // 4, 1)}", "train.eval_batches=8",
         f"train.save_every={max(args.warmup_steps // 4, 1)}"], logs / "warmup.log",
        args.threads))

    bank = out / "bank-warmup"
    top_k = [] if args.memory_top_k is None else ["--memory-top-k", str(args.memory_top_k)]
    # The corpus's shards name the tokenizer every job reads (a --warmup-run may record a
    # data.path relative to wherever it was launched).
    from memory3.data import load_manifest
    global TOKENIZER
    TOKENIZER = load_manifest(shards)["tokenizer"]["path"]
    tokenizer = ["--tokenizer", TOKENIZER]
    bank_args = ["--knowledge", str(files["kb"]), "--embedder", args.embedder,
                 "--memory-layers", args.memory_layers, *top_k, *tokenizer, "--no-progress"]
    stage("bank (warmup weights)", bank_complete(bank), lambda: memory3(
        ["build-bank", "--checkpoint", str(warmup), "--out", str(bank), *bank_args],
        logs / "bank-warmup.log", args.threads))

    continual = (Path(args.continual_run).resolve() if args.continual_run
                 else out / f"continual{args.tag}")
    stage("continual", bool(args.continual_run) or last_step(continual) >= args.continual_steps,
          lambda: memory3(
        ["train", "--recipe", args.continual_recipe, "--out", str(continual), "--no-progress",
         *common, f"continual.bank={bank}", f"train.init_from={warmup}",
         f"train.max_steps={args.continual_steps}", f"optim.lr={args.continual_lr}",
         f"optim.min_lr={args.continual_lr / 10}",
         f"train.eval_every={max(args.continual_steps // 3, 1)}", "train.eval_batches=8",
         f"train.save_every={max(args.continual_steps // 3, 1)}",
         *([] if args.memory_top_k is None else [f"model.memory_top_k={args.memory_top_k}"]),
         *args.continual_set],
        logs / f"continual{args.tag}.log", args.threads))

    eval_bank = out / f"bank-continual{args.tag}" if args.eval_bank == "continual" else bank
    stage("bank (continual weights)", bank_complete(eval_bank), lambda: memory3(
        ["build-bank", "--checkpoint", str(continual), "--out", str(eval_bank), *bank_args],
        logs / f"bank-continual{args.tag}.log", args.threads))

    data = files[args.slice]
    scoring = f"-context{args.eval_context}" if args.eval_context else ""
    evals = {}
    for name, ckpt, b, modes in (("continual", continual, eval_bank, args.modes),
                                 ("warmup", warmup, bank, args.warmup_modes)):
        path = out / (f"eval-{args.slice}-{name}{args.tag if name == 'continual' else ''}"
                      f"{scoring}.json")
        stage(f"eval {name}", path.exists(), lambda ckpt=ckpt, b=b, path=path, modes=modes: memory3(
            ["eval", "--checkpoint", str(ckpt), "--data", str(data), *tokenizer,
             # mode none needs no bank (and a --warmup-run's reads other layers than its bank)
             *(["--bank", str(b)] if set(modes.split(",")) - {"none"} else []),
             "--modes", modes, "--max-sequences", str(args.eval_sequences),
             "--seq-len", str(args.seq_len), "--context", str(args.eval_context),
             "--json", str(path)],
            logs / f"{path.stem}.log", args.threads))
        evals[name] = json.loads(path.read_text())

    import torch
    torch.set_num_threads(args.threads)
    retrieval = {} if args.corpus == "own" else stage(  # own: no subjects to score against
        "retrieval", False, lambda: retrieval_hits(continual, eval_bank, data, files["kb"],
                                                   args.seq_len, args.eval_sequences))

    oracle = {name: stage(f"text oracle {name}", False, lambda ckpt=ckpt: text_oracle(
        ckpt, data, files["kb"], args.seq_len)) for name, ckpt in (("continual", continual),
                                                                   ("warmup", warmup))}

    copying = {name: stage(f"copying {name}", False, lambda ckpt=ckpt: copy_test(
        ckpt, data, continual)) for name, ckpt in (("continual", continual), ("warmup", warmup))}

    decoding = stage("decoding", False, lambda: decode_speed(continual, eval_bank, data))

    corpus = json.loads((out / "corpus.json").read_text())
    c = evals["continual"]
    ratios = {"memory_vs_none_ppl": c["memory"]["perplexity"] / c["none"]["perplexity"],
              "memory_vs_rag_ppl": c["memory"]["perplexity"] / c["rag"]["perplexity"],
              "memory_vs_rag_tokens_per_s": (c["memory"]["tokens_per_s"]
                                              / c["rag"]["tokens_per_s"])}
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
                         f"{os.getloadavg()[0]:.1f} at the end",
              "args": vars(args), "corpus": corpus,
              "training": {"warmup": metrics_summary(warmup),
                           "continual": metrics_summary(continual)},
              "eval": evals, "ratios": ratios, "retrieval": retrieval, "text_oracle": oracle,
              "copying": copying, "decoding": decoding,
              "stage_seconds": stage_seconds}
    path = out / f"results-{args.slice}{args.tag}{scoring}.json"
    if path.exists():  # a re-run skips finished stages: keep the times they took then
        report["stage_seconds"] = {**json.loads(path.read_text())["stage_seconds"],
                                   **stage_seconds}
    path.write_text(json.dumps(report, indent=1) + "\n")
    if args.slice == "heldout" and not args.tag and not args.eval_context:
        (out / "results.json").write_text(path.read_text())

    tr = report["training"]
    for name in ("warmup", "continual"):
        t = tr[name]
        val = ", ".join(f"{v['step']}: {v['val_loss']:.3f}" for v in t["val"])
        print(f"{name}: {t['steps']} steps, train loss {t['loss_first10']:.3f} -> "
              f"{t['loss_last10']:.3f}, val loss [{val}], {t['tokens_per_s_median']:.0f} tok/s")
    print(f"\n{args.slice} {args.corpus}: {c['none']['tokens']} tokens scored "
          f"({c['none']['tokens'] // (args.seq_len - args.eval_context)} sequences of "
          f"{args.seq_len}" + (f", the first {args.eval_context} context only)"
                               if args.eval_context else ")"))
    print(f"{'checkpoint':<10} {'mode':<7} {'perplexity':>10} {'tokens/s':>9}")
    for name, res in evals.items():
        for mode in (m for m in ("none", "memory", "rag", "memory_own_chunk") if m in res):
            print(f"{name:<10} {mode:<7} {res[mode]['perplexity']:>10.3f} "
                  f"{res[mode]['tokens_per_s']:>9.0f}")
    print(f"\nmemory/none perplexity {ratios['memory_vs_none_ppl']:.3f} (goal <= 0.90); "
          f"memory/rag perplexity {ratios['memory_vs_rag_ppl']:.3f} (goal <= 1.05); "
          f"memory/rag tokens/s {ratios['memory_vs_rag_tokens_per_s']:.2f} (goal > 1)")
    for name, o in oracle.items():
        print(f"text oracle ({name}, {o['documents']} documents): perplexity alone "
              f"{o['perplexity_alone']:.2f}, after the knowledge on their subject "
              f"{o['perplexity_subject']:.2f}, after random knowledge "
              f"{o['perplexity_random']:.2f}; "
              f"on the tokens after each document's first chunk (what causal retrieval can serve) "
              f"{o['perplexity_alone_rest']:.2f} / {o['perplexity_subject_rest']:.2f} / "
              f"{o['perplexity_random_rest']:.2f}")
        if "perplexity_memory" in o:
            print("  the subject's reference as the memory every chunk reads, all / head / rest: "
                  + "; ".join(f"{k} " + " / ".join(f"{o[f'perplexity_{k}{part}']:.2f}"
                                                    for part in ("", "_head", "_rest"))
                              for k in ("memory", "memory_dense", "memory_causal")))
    for name, c in copying.items():
        print(f"copy probe ({name}, {c['spans']} held-out spans of {c['length']} tokens): loss "
              f"on the first / second copy {c['first_copy_loss']:.2f} / "
              f"{c['second_copy_loss']:.2f} nats, ratio {c['ratio']:.3f}; the span as its own "
              f"memory: " + ", ".join(f"{k} (top_k {m['top_k']}) {m['ratio']:.3f}"
                                      for k, m in c["through_memory"].items()))
    d = decoding
    print(f"decoding ({d['prompts']} held-out prompts of {d['prompt_tokens']} tokens, "
          f"{d['new_tokens']} new, x{d['reps']}): tokens/s none "
          f"{d['tokens_per_s']['none']:.0f}, memory {d['tokens_per_s']['memory']:.0f}, rag "
          f"{d['tokens_per_s']['rag']:.0f}; memory/rag {d['memory_vs_rag']:.2f}x (goal >= 2), "
          f"memory/none {d['memory_vs_none']:.2f}x")
    for name, r in retrieval.items():
        print(f"retrieval ({name} query): {r['hit_rate']:.3f} of {r['chunks_reading_memories']} "
              f"chunks read a reference on one of their subjects; "
              f"{r['same_subject_reference_fraction']:.3f} of their "
              f"{r['references_per_chunk']:.2f} references per chunk are such entries")


if __name__ == "__main__":
    main()
