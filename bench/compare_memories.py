"""Every kind of memory on one corpus: one tokenizer, one base model, the same held-out tokens
(issue 13 §2). One table, a row per kind:

  base              the base model alone (`memory3 eval --modes none`)
  rag               in-context RAG per chunk: the base reads, in front of every 64-token chunk,
                    the references retrieved with the chunk before it, as text (`--modes rag`)
  continual alone   the continual checkpoint without references (its sink only, `--modes none`):
                    what continual training on the domain text gives without memory, so the
                    memory row's gain can be told apart from it
  memory            explicit memory (Memory3): the continual checkpoint reading, per chunk, the
                    memories of the same retrieved references from a bank it encoded
                    (`--modes memory`)
  knn-lm            the base mixed with p_kNN from a datastore of the training text
                    (`memory3 memdec eval --knn-datastore`)
  memdec            the base mixed with a Memory Decoder distilled from that datastore
                    (`memory3 memdec eval --decoder`)

Columns: perplexity, bits per byte (the nats of the scored tokens over the UTF-8 bytes they
decode to, `memory3 eval`'s definition, computed for the memdec rows from their losses and the
same byte count), tokens/s, and the bytes on disk the row needs beyond the base model: the bank's
references, embeddings and index (rag), the whole eval bank (memory), the datastore folder
(knn-lm), the decoder's weights file (memdec). The continual checkpoint replaces the base's
weights (the same shape), so it counts 0.

Fairness: every row scores the same tokens with the same context. `memory3 eval` cuts the
held-out text into [BOS] doc [EOS] ... and that stream into rows of seq_len + 1 tokens, each
scored from its own start; `memory3 memdec eval --seq-len` cuts token shards of the same text
(`prepare-data --valid-fraction 0`, split train) into the very same rows. Before any row is
scored the two token streams are compared here, token by token, and after scoring the base is
compared with itself: `memdec eval` scores it too, and its loss must equal `eval`'s (else the
table is still written, and the run fails).

Everything runs through the `memory3` command, each stage skipped when its output is complete
and was made by the same command, so a re-run continues where it stopped (the library's jobs
resume mid-way too). An evaluation is redone when a stage it reads ran again; a bank, datastore
or run whose inputs changed is not: give a new --out for new settings.

    python bench/compare_memories.py --out bench_runs/compare-mine \\
        --train-text domain/ --knowledge kb.jsonl --heldout heldout.txt \\
        --base runs/cpu --continual-recipe cpu-continual --memory-layers all \\
        --memdec-recipe memdec-small --memdec-steps 500

Without --base a tokenizer and a warmup model (--warmup-recipe) are trained on --train-text.
Writes OUT/compare.json and prints the table, its footnotes and every command, numbered.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from jobs import bank_complete, last_step, run_memory3  # noqa: E402

ROWS = ("base", "rag", "continual alone", "memory", "knn-lm", "memdec")
# Bank files that hold memories (store.py); RAG reads only the references, embeddings and index.
MEMORY_SUFFIXES = (".kv", ".pos", ".rec", ".memsum")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-text", nargs="+", default=[],
                   help="domain text (files or folders, any format `memory3 prepare-data` "
                        "reads): the continual phase, the kNN datastore and the decoder's "
                        "distillation (and the warmup, without --base)")
    p.add_argument("--knowledge", nargs="+", default=[],
                   help="the knowledge base (JSON Lines or text): the bank and RAG")
    p.add_argument("--heldout", nargs="+", default=[],
                   help="held-out text, in neither --train-text nor --knowledge")
    p.add_argument("--glob", action="append",
                   help="read the files of folders whose names match (e.g. '*.py'), each whole "
                        "as one document, for all three inputs (see memory3 prepare-data --glob)")
    p.add_argument("--out", required=True, help="folder for every stage's output")
    p.add_argument("--base", help="a finished warmup run to start from; its tokenizer tokenizes "
                                  "everything (default: train a tokenizer and a warmup here)")
    p.add_argument("--vocab-size", type=int, default=4096,
                   help="without --base: the tokenizer's vocabulary")
    p.add_argument("--warmup-recipe", default="small-warmup", help="without --base")
    p.add_argument("--warmup-steps", type=int, help="default: the recipe's train.max_steps")
    p.add_argument("--warmup-set", nargs="+", default=[], metavar="SECTION.FIELD=VALUE",
                   help="further overrides of the warmup recipe")
    p.add_argument("--continual-recipe", default="small-continual",
                   help="continual phase, from the base's weights (the base's shape)")
    p.add_argument("--continual-steps", type=int, help="default: the recipe's train.max_steps")
    p.add_argument("--continual-set", nargs="+", default=[], metavar="SECTION.FIELD=VALUE",
                   help="further overrides of the continual recipe")
    p.add_argument("--continual-run",
                   help="a finished continual run (from --base, in its tokenizer) to evaluate "
                        "instead of training one here: the bank it reads is built by it")
    p.add_argument("--memory-layers",
                   help="the layers the continual run reads memory in, when not the base's "
                        "(e.g. `all` for cpu-continual on a cpu-warmup base); its training "
                        "bank is built for them, and RAG reads a bank of the base's own")
    p.add_argument("--memory-top-k", type=int, help="as --memory-layers, for model.memory_top_k")
    p.add_argument("--embedder", help="retrieval embedder of the banks (memory3 build-bank "
                                      "--embedder; default: build-bank's)")
    p.add_argument("--memdec-recipe", default="memdec-small",
                   help="Memory Decoder distillation (same tokenizer as the base)")
    p.add_argument("--memdec-steps", type=int, help="default: the recipe's train.max_steps")
    p.add_argument("--memdec-set", nargs="+", default=[], metavar="SECTION.FIELD=VALUE",
                   help="further overrides of the memdec recipe")
    p.add_argument("--datastore-max-tokens", type=int,
                   help="store only the first N positions of --train-text (default: all)")
    p.add_argument("--knn-k", type=int, default=1024,
                   help="neighbours, for the decoder's targets and for kNN-LM")
    p.add_argument("--knn-temperature", type=float, default=1.0,
                   help="p_kNN = softmax(-distance / T), for the targets and for kNN-LM")
    p.add_argument("--knn-lambda", type=float, default=0.25, help="kNN-LM's weight of p_kNN")
    p.add_argument("--lambda", dest="lam", type=float, default=0.6, help="the decoder's weight")
    p.add_argument("--seq-len", type=int,
                   help="tokens per scored row (default: the base's data.seq_len, at most "
                        "the shortest max_seq_len of the models involved)")
    p.add_argument("--max-sequences", type=int, default=64, help="rows scored")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward, every row")
    # One thread: on a shared 2-core machine a second OpenMP thread mostly waits (see
    # bench/memory_real_text.py).
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    missing = [flag for flag, v in (("--train-text", args.train_text),
                                    ("--knowledge", args.knowledge),
                                    ("--heldout", args.heldout)) if not v]
    if missing:
        p.error(f"{', '.join(missing)} missing: give the domain text (--train-text), the "
                f"knowledge base (--knowledge) and held-out text (--heldout), files or folders")
    for flag, value in (("--max-sequences", args.max_sequences), ("--batch-size", args.batch_size),
                        ("--seq-len", args.seq_len), ("--threads", args.threads)):
        if value is not None and value <= 0:
            p.error(f"{flag} must be a positive integer, got {value}")
    if args.continual_run:
        given = [f for f, v in (("--continual-steps", args.continual_steps),
                                ("--continual-set", args.continual_set),
                                ("--memory-layers", args.memory_layers),
                                ("--memory-top-k", args.memory_top_k)) if v]
        if not args.base or given:
            p.error("--continual-run evaluates a run trained elsewhere: it needs the --base it "
                    "started from" + (f", and {', '.join(given)} would change nothing"
                                      if given else ""))
        if not Path(args.continual_run).exists():
            p.error(f"--continual-run {args.continual_run}: no such run")
    if args.base and not Path(args.base).exists():
        p.error(f"--base {args.base}: no such run (expected a folder of `memory3 train`)")
    return args


class Pipeline:
    """Runs `python -m memory3 ...` stages in OUT, each skipped when done; records every
    command (run or skipped) so that each row can name the ones it needs."""

    def __init__(self, out: Path, threads: int):
        self.out, self.threads = out, threads
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.record = out / "stages.json"  # stage -> command of its finished output
        self.finished = json.loads(self.record.read_text()) if self.record.exists() else {}
        self.commands: dict[str, str] = {}
        self.ran: list[str] = []
        self.seconds: dict[str, float] = {}

    def stage(self, name: str, args: list[str], done: bool, after: tuple[str, ...] = ()):
        """Run `memory3 args` unless its output is `done`, made by this very command, and no
        stage it reads (`after`) ran again now (its output would be stale)."""
        command = shlex.join(["memory3", *args])
        self.commands[name] = command
        if done and self.finished.get(name) == command and not set(after) & set(self.ran):
            print(f"[{name}] done before, skipped", flush=True)
            return
        start = time.perf_counter()
        self._run(name, args)
        self.seconds[name] = round(time.perf_counter() - start, 1)
        self.ran.append(name)
        self.finished[name] = command
        self.record.write_text(json.dumps(self.finished, indent=1) + "\n")
        print(f"[{name}] {self.seconds[name]:.0f} s", flush=True)

    def _run(self, name: str, args: list[str]) -> None:
        log = self.logs / (re.sub(r"[^a-z0-9]+", "-", name).strip("-") + ".log")
        run_memory3(args, log, self.threads, label=f"[{name}] ")


# -- when is a stage's output complete ------------------------------------------------------
def manifest_complete(folder: Path) -> bool:
    """Token shards, datastores and kNN targets all say `complete` in their manifest."""
    manifest = folder / "manifest.json"
    return manifest.exists() and json.loads(manifest.read_text()).get("complete") is True


def train_args(recipe: str, out: Path, steps: int | None, overrides: list[str]) -> tuple[list, int]:
    """`memory3 train` arguments, and the step it ends at (the recipe's own unless `steps`)."""
    from memory3.config import Recipe
    overrides = [*overrides, *([f"train.max_steps={steps}"] if steps else [])]
    end = Recipe.from_name(recipe).override(overrides).train.max_steps
    return ["train", "--recipe", recipe, "--out", str(out), "--no-progress", *overrides], end


# -- footprints -------------------------------------------------------------------------------
def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*")
               if f.is_file() and f.name != "write.lock")


def bank_text_bytes(bank: Path) -> int:
    """What RAG reads of a bank: references, embeddings, index, manifest (no memories, no
    codec)."""
    return sum(f.stat().st_size for f in bank.rglob("*")
               if f.is_file() and f.name != "write.lock" and not f.name.endswith(MEMORY_SUFFIXES)
               and "codec" not in f.relative_to(bank).parts)


def weights_bytes(run: Path) -> int:
    """The weights file of a run's newest checkpoint (optimizer state is not needed to read)."""
    from memory3.checkpoints import EXPORT_WEIGHTS, MODEL_STATES, resolve
    ckpt_dir, tag = resolve(run)
    for name in (MODEL_STATES, EXPORT_WEIGHTS):
        if (ckpt_dir / tag / name).exists():
            return (ckpt_dir / tag / name).stat().st_size
    raise SystemExit(f"{ckpt_dir / tag}: neither {MODEL_STATES} nor {EXPORT_WEIGHTS}")


# -- the same tokens --------------------------------------------------------------------------
def same_stream(base: Path, heldout: list[str], glob, heldout_shards: Path, seq_len: int,
                max_sequences: int) -> dict:
    """The rows `memory3 eval` scores, checked equal to the rows `memdec eval --seq-len` cuts
    from the held-out shards; their target count and the UTF-8 bytes those decode to."""
    import numpy as np

    from memory3.checkpoints import load_tokenizer
    from memory3.data import TokenShards
    from memory3.eval.perplexity import text_sequences
    tok = load_tokenizer(base)
    rows = text_sequences(heldout, tok, seq_len, max_sequences=max_sequences, glob=glob)
    shards = TokenShards(heldout_shards, "train")
    stream = shards.read(0, min(len(shards), rows.numel()))
    if not np.array_equal(stream.astype(np.int64), rows.flatten().numpy()):
        sys.exit(f"the held-out shards {heldout_shards} do not hold the token stream `memory3 "
                 f"eval` reads from {' '.join(heldout)}: the rows would score different tokens")
    targets = rows[:, 1:].numpy()
    return {"sequences": len(rows), "tokens": int(targets.size),
            "bytes": int(tok.token_bytes()[targets].sum())}


# -- main ------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    run = Pipeline(out, args.threads)
    glob = [a for g in (args.glob or []) for a in ("--glob", g)]
    train_text = [str(Path(p).resolve()) for p in args.train_text]
    knowledge = [str(Path(p).resolve()) for p in args.knowledge]
    heldout = [str(Path(p).resolve()) for p in args.heldout]

    # The tokenizer: the base's, or one trained on the domain text with the warmup.
    tok_dir, shards, heldout_shards = out / "tokenizer", out / "shards", out / "heldout-shards"
    if args.base:
        from memory3.checkpoints import load_tokenizer
        base = Path(args.base).resolve()
        tokenizer = str(load_tokenizer(base).path)
        building_base: tuple[str, ...] = ()
    else:
        base, tokenizer = out / "base", str(tok_dir)
        run.stage("tokenizer", ["train-tokenizer", *train_text, *glob, "--out", str(tok_dir),
                                "--vocab-size", str(args.vocab_size)],
                  (tok_dir / "tokenizer.model").exists())
        building_base = ("tokenizer", "shards", "warmup")
    run.stage("shards", ["prepare-data", *train_text, *glob, "--tokenizer", tokenizer, "--out",
                         str(shards), "--valid-fraction", "0.01"], manifest_complete(shards))
    # Held out whole (valid fraction 0: every document in split train), for memdec eval.
    run.stage("heldout shards", ["prepare-data", *heldout, *glob, "--tokenizer", tokenizer,
                                 "--out", str(heldout_shards), "--valid-fraction", "0"],
              manifest_complete(heldout_shards))
    if not args.base:
        cmd, end = train_args(args.warmup_recipe, base, args.warmup_steps,
                              [f"data.path={shards}", *args.warmup_set])
        run.stage("warmup", cmd, last_step(base) >= end)

    # Explicit memory: a bank by the base's weights (read by continual training), the continual
    # phase, and a bank by the continual weights (read at evaluation, as it would serve).
    embedder = ["--embedder", args.embedder] if args.embedder else []
    reads = {"memory_layers": args.memory_layers, "memory_top_k": args.memory_top_k}
    reads = {k: str(v) for k, v in reads.items() if v is not None}
    read_flags = [a for k, v in reads.items() for a in ("--" + k.replace("_", "-"), v)]
    bank_base, bank_rag = out / "bank-base", out / "bank-base"
    run.stage("bank (base weights)", ["build-bank", "--checkpoint", str(base), "--knowledge",
                                      *knowledge, *glob, "--out", str(bank_base), *embedder,
                                      *read_flags, "--no-progress"], bank_complete(bank_base))
    if read_flags:  # the base itself reads other layers: RAG needs a bank of its own config
        bank_rag = out / "bank-rag"
        run.stage("bank (rag)", ["build-bank", "--checkpoint", str(base), "--knowledge",
                                 *knowledge, *glob, "--out", str(bank_rag), *embedder,
                                 "--no-progress"], bank_complete(bank_rag))
    rag_bank_stage = "bank (rag)" if read_flags else "bank (base weights)"
    if args.continual_run:
        continual = Path(args.continual_run).resolve()
        if load_tokenizer(continual).sha256 != load_tokenizer(base).sha256:
            sys.exit(f"--continual-run {continual} reads another tokenizer than --base {base}")
    else:
        continual = out / "continual"
        cmd, end = train_args(args.continual_recipe, continual, args.continual_steps,
                              [f"data.path={shards}", f"continual.bank={bank_base}",
                               f"train.init_from={base}",
                               *(f"model.{k}={v}" for k, v in reads.items()), *args.continual_set])
        run.stage("continual", cmd, last_step(continual) >= end)
    bank_continual = out / "bank-continual"
    run.stage("bank (continual weights)", ["build-bank", "--checkpoint", str(continual),
                                           "--knowledge", *knowledge, *glob, "--out",
                                           str(bank_continual), *embedder, "--no-progress"],
              bank_complete(bank_continual))

    # Memory Decoder and kNN-LM: a datastore of the base over the domain text, kNN targets,
    # the decoder distilled from them.
    datastore, targets, decoder = out / "datastore", out / "targets", out / "decoder"
    limit = ["--max-tokens", str(args.datastore_max_tokens)] if args.datastore_max_tokens else []
    run.stage("datastore", ["memdec", "build-datastore", "--base", str(base), "--data",
                            str(shards), "--out", str(datastore), *limit, "--no-progress"],
              manifest_complete(datastore))
    run.stage("targets", ["memdec", "build-targets", "--datastore", str(datastore), "--out",
                          str(targets), "--k", str(args.knn_k), "--temperature",
                          str(args.knn_temperature), "--no-progress"], manifest_complete(targets))
    cmd, end = train_args(args.memdec_recipe, decoder, args.memdec_steps,
                          [f"data.path={shards}", f"memdec.targets={targets}", *args.memdec_set])
    run.stage("decoder", cmd, last_step(decoder) >= end)

    # One row length for all: what every model involved reads.
    from memory3.checkpoints import model_config, read_info
    from memory3.config import Recipe
    longest = min(model_config(r).max_seq_len for r in (base, continual, decoder))
    seq_len = args.seq_len or min(Recipe.from_dict(read_info(base)["recipe"]).data.seq_len,
                                  longest)
    if seq_len > longest:
        sys.exit(f"--seq-len {seq_len}: the models involved read at most {longest} tokens")
    fair = same_stream(base, heldout, args.glob, heldout_shards, seq_len, args.max_sequences)
    rows_flags = ["--seq-len", str(seq_len), "--max-sequences", str(args.max_sequences),
                  "--batch-size", str(args.batch_size)]

    evals = {name: out / f"eval-{name}.json" for name in ("base", "continual", "memdec")}
    run.stage("eval base", ["eval", "--checkpoint", str(base), "--bank", str(bank_rag),
                            "--data", *heldout, *glob, "--modes", "none,rag", *rows_flags,
                            "--json", str(evals["base"])], evals["base"].exists(),
              after=(*building_base, rag_bank_stage))
    run.stage("eval continual", ["eval", "--checkpoint", str(continual), "--bank",
                                 str(bank_continual), "--data", *heldout, *glob, "--modes",
                                 "none,memory", *rows_flags, "--json", str(evals["continual"])],
              evals["continual"].exists(), after=("continual", "bank (continual weights)"))
    run.stage("eval memdec", ["memdec", "eval", "--base", str(base), "--decoder", str(decoder),
                              "--knn-datastore", str(datastore), "--data", str(heldout_shards),
                              "--split", "train", "--lambda", str(args.lam), "--knn-lambda",
                              str(args.knn_lambda), "--knn-k", str(args.knn_k),
                              "--knn-temperature", str(args.knn_temperature), *rows_flags,
                              "--no-progress", "--json", str(evals["memdec"])],
              evals["memdec"].exists(),
              after=(*building_base, "heldout shards", "datastore", "decoder"))

    # What the continual run needed, unless it was given (then --continual-run names it).
    training = () if args.continual_run else (*building_base, "shards", "bank (base weights)",
                                              "continual")
    report = build_report(args, run, fair, seq_len, evals, {
        "rag": (bank_text_bytes(bank_rag), f"{bank_rag.name}: references, embeddings, index"),
        "memory": (folder_bytes(bank_continual), f"{bank_continual.name}: the whole bank"),
        "knn-lm": (folder_bytes(datastore), f"{datastore.name}: keys, values, index"),
        "memdec": (weights_bytes(decoder), f"{decoder.name}: newest checkpoint's weights"),
    }, {"base": (*building_base, "eval base"),
        "rag": (*building_base, rag_bank_stage, "eval base"),
        "continual alone": (*training, "bank (continual weights)", "eval continual"),
        "memory": (*training, "bank (continual weights)", "eval continual"),
        "knn-lm": (*building_base, "shards", "heldout shards", "datastore", "eval memdec"),
        "memdec": (*building_base, "shards", "heldout shards", "datastore", "targets", "decoder",
                   "eval memdec")}, model_config(continual).retrieval_query)
    path = out / "compare.json"
    if path.exists():  # a re-run skips finished stages: keep the times they took then
        report["stage_seconds"] = {**json.loads(path.read_text())["stage_seconds"],
                                   **report["stage_seconds"]}
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(format_report(report))
    print(f"\nwrote {path}")
    c = report["checks"]
    if c["base_loss_gap"] > 1e-4 * max(1.0, c["base_loss_eval"]):
        sys.exit(f"the base scored {c['base_loss_eval']:.6f} nats/token by `memory3 eval` and "
                 f"{c['base_loss_memdec_eval']:.6f} by `memory3 memdec eval`: the two did not "
                 f"score the same rows, so the memdec rows are not comparable")
    return report


def build_report(args, run: Pipeline, fair: dict, seq_len: int, evals: dict[str, Path],
                 footprints: dict[str, tuple[int, str]], needs: dict[str, tuple],
                 query: str) -> dict:
    e_base, e_cont = (json.loads(evals[n].read_text()) for n in ("base", "continual"))
    memdec = {r["mode"]: r for r in json.loads(evals["memdec"].read_text())}
    measured = {"base": e_base["none"], "rag": e_base["rag"], "continual alone": e_cont["none"],
                "memory": e_cont["memory"]}
    for name, mode in (("knn-lm", "knn-lm"), ("memdec", "memdec")):
        r = memdec[mode]
        nll = r["nll_per_token"] * r["tokens"]
        # bits per byte as `memory3 eval` computes it: the summed nats over the targets' bytes
        measured[name] = {"perplexity": r["perplexity"], "loss": r["nll_per_token"],
                          "bits_per_byte": nll / math.log(2) / fair["bytes"],
                          "tokens": r["tokens"], "bytes": fair["bytes"],
                          "tokens_per_s": r["tokens_per_s"], "time_vs_base": r["time_vs_base"]}
    for name, m in measured.items():
        if m["tokens"] != fair["tokens"] or m["bytes"] != fair["bytes"]:
            sys.exit(f"row {name} scored {m['tokens']} tokens ({m['bytes']} bytes), not the "
                     f"{fair['tokens']} ({fair['bytes']} bytes) of the held-out rows")
    rows = []
    for name in ROWS:
        size, what = footprints.get(name, (0, "none beyond the base's weights" if name == "base"
                                           else "its weights replace the base's (same shape)"))
        rows.append({"row": name, **measured[name], "footprint_bytes": size, "footprint": what,
                     "context": context(name, seq_len, query),
                     "commands": [c for s, c in run.commands.items() if s in needs[name]]})
    # The base scored by both commands: the same rows must give the same loss.
    base_gap = abs(memdec["base"]["nll_per_token"] - e_base["none"]["loss"])
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
                       f"{os.getloadavg()[0]:.1f} at the end",
            "args": vars(args), "seq_len": seq_len, **fair, "rows": rows,
            "checks": {"same_token_stream": True,
                       "base_loss_eval": e_base["none"]["loss"],
                       "base_loss_memdec_eval": memdec["base"]["nll_per_token"],
                       "base_loss_gap": base_gap,
                       "memdec_eval_base_tokens_per_s": memdec["base"]["tokens_per_s"]},
            "commands": run.commands, "ran": run.ran, "stage_seconds": run.seconds}


def context(row: str, seq_len: int, query: str = "chunk") -> str:
    rows = (f"its row only: token i of a row of {seq_len} targets is predicted from the i tokens "
            f"before it in that row (the held-out [BOS] doc [EOS] stream cut into rows of "
            f"{seq_len + 1}; no context crosses rows)")
    chunks = ("per 64-token chunk (the model's chunk_len), the references retrieved with "
              + ("the head of the document under way" if query == "document" else
                 "the chunk before it")
              + " (causal; the first chunk of a row reads none; references overlapping the row "
                "by more than 2/3 skipped)")
    return {
        "base": rows,
        "rag": f"{chunks}, as [BOS] ref [EOS] text in front of the chunk, then the row before "
               f"it; where references and row exceed max_seq_len the chunk stays whole and the "
               f"earliest row tokens are dropped. One forward per chunk",
        "continual alone": f"{rows}; plus the reference-BOS sink",
        "memory": f"{rows}; plus, {chunks}, their memories (sparse keys/values) and the sink",
        "knn-lm": f"{rows}; the base's key at the position queries the datastore (the same row "
                  f"prefix)",
        "memdec": f"{rows}; the decoder reads the same row prefix, no retrieval",
    }[row]


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_report(report: dict) -> str:
    lines = [f"{report['tokens']} held-out tokens ({report['sequences']} rows of "
             f"{report['seq_len']}, {report['bytes']} bytes), the same in every row",
             f"{'row':<16} {'perplexity':>10} {'bits/byte':>9} {'tokens/s':>9} {'on disk':>10}"]
    for r in report["rows"]:
        lines.append(f"{r['row']:<16} {r['perplexity']:>10.3f} {r['bits_per_byte']:>9.4f} "
                     f"{r['tokens_per_s']:>9.0f} {human(r['footprint_bytes']):>10}")
    c = report["checks"]
    lines += ["", "Context of each row:"]
    lines += [f"  {r['row']}: {r['context']}" for r in report["rows"]]
    lines += ["", "On disk (beyond the base):"]
    lines += [f"  {r['row']}: {r['footprint']}" for r in report["rows"]]
    lines += ["", f"tokens/s: base, rag, continual alone and memory as `memory3 eval` times each "
                  f"mode; knn-lm and memdec as `memory3 memdec eval` times them, interleaved with "
                  f"the base (which ran there at {c['memdec_eval_base_tokens_per_s']:.0f} "
                  f"tokens/s). The base's loss by both commands: {c['base_loss_eval']:.6f} and "
                  f"{c['base_loss_memdec_eval']:.6f}.", "", "Commands:"]
    if report["args"]["base"]:
        lines.append(f"  0. the base: the warmup run given as --base {report['args']['base']}")
    if report["args"]["continual_run"]:
        lines.append(f"  0. the continual run given as --continual-run "
                     f"{report['args']['continual_run']}")
    number = {cmd: i + 1 for i, cmd in enumerate(report["commands"].values())}
    lines += [f"  {i}. {cmd}" for cmd, i in number.items()]
    lines += [f"  {r['row']}: " + " ".join(str(number[c]) for c in r["commands"])
              for r in report["rows"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
