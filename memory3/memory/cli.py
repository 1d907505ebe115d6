"""`memory3 build-bank` and `memory3 bank verify`: parsers and commands (wired into memory3.cli).

Also runnable alone: `python -m memory3.memory.cli --checkpoint ... --knowledge ... --out ...`.
"""
from __future__ import annotations

import argparse
import sys


DESCRIPTION = ("Cut the documents of a knowledge base into references, encode each into a "
               "sparse memory with a checkpoint's own weights, and store them with a retrieval "
               "index. Interrupted? Run the same command again: it resumes. An existing bank is "
               "extended with the references it does not hold yet. Runs under torchrun/deepspeed "
               "too, one shard writer per rank.")


def add_build_bank_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "build-bank", help="encode a knowledge base into a memory bank (resumable)",
        description=DESCRIPTION)
    _add_arguments(p)
    p.set_defaults(func=cmd_build_bank)
    return p


def add_bank_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bank", help="inspect a memory bank")
    actions = p.add_subparsers(dest="action", required=True)
    v = actions.add_parser(
        "verify", help="check every file and record of a bank (exit status 1 if any is damaged)",
        description="Hash every file against the manifest, check every reference row and memory "
                    "against its checksum, the codec and the index; list every problem found.")
    v.add_argument("bank", help="bank folder")
    v.set_defaults(func=cmd_bank_verify)
    return p


def cmd_bank_verify(args: argparse.Namespace) -> None:
    from memory3.memory.verify import verify_bank

    problems, counts = verify_bank(args.bank)
    checked = (f"{counts['files']} files, {counts['rows']:,} rows, "
               f"{counts['memories']:,} memory records")
    if problems:
        print(f"{args.bank}: DAMAGED ({len(problems)} problem(s); checked {checked})")
        for problem in problems:
            print(f"  {problem}")
        sys.exit(1)
    print(f"{args.bank}: OK ({checked})")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from memory3.cliargs import fraction, positive_int
    from memory3.data.text import GLOB_HELP, INPUTS_HELP

    p.add_argument("--checkpoint", required=True,
                   help="run directory, its checkpoints/ folder or one step-* folder")
    p.add_argument("--knowledge", required=True, nargs="+", help=INPUTS_HELP)
    p.add_argument("--glob", action="append", default=None, metavar="PATTERN", help=GLOB_HELP)
    p.add_argument("--out", required=True, help="bank folder (created, resumed or extended)")
    p.add_argument("--embedder", default=None,
                   help="hashing[:dim] (default hashing:512 for a new bank), lexical[:dim] "
                        "(TF-IDF fitted on the knowledge base) or st:<local "
                        "sentence-transformers model folder>; an existing bank keeps its own")
    p.add_argument("--min-relative-score", type=fraction, default=None, metavar="R",
                   help="retrieval leaves out references scoring below R x the query's best "
                        "(default 0: none; recorded in a new bank)")
    p.add_argument("--codec", default=None,
                   help="none (bf16, default), fp32, or a FAISS factory string such as SQ8, "
                        "OPQ14_84,PQ14 or the shorthand opq14 (14 bytes per vector)")
    p.add_argument("--index", default=None,
                   help="FAISS factory string for the retrieval index (default: by size: Flat, "
                        "then HNSW, then IVF)")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="references per encoder batch")
    p.add_argument("--shard-memories", type=positive_int, default=1024,
                   help="memories per shard (= per commit)")
    p.add_argument("--text-field", default="text",
                   help="JSON Lines field or Parquet column holding the text")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.model or its folder (default: the one the checkpoint's "
                        "training data was prepared with)")
    p.add_argument("--shard-dir", default=None,
                   help="write this run's shards here instead of OUT/shards (another disk, or "
                        "each node's own mount; the manifest records the folder)")
    p.add_argument("--memory-layers", default=None, metavar="LAYERS",
                   help="layers whose memories the bank stores: first_half, middle_half, all, "
                        "or indices like 0,1 (default: the checkpoint's model.memory_layers; "
                        "give the continual recipe's when it reads other layers)")
    p.add_argument("--memory-top-k", type=positive_int, default=None, metavar="K",
                   help="tokens kept per memory layer and KV head (default: the checkpoint's "
                        "model.memory_top_k; give the continual recipe's when it keeps another "
                        "number)")
    p.add_argument("--device", default=None, help="default: this rank's GPU if any, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _layers(spec: str | None) -> str | list[int] | None:
    if spec is None or not spec.replace(",", "").replace(" ", "").isdigit():
        return spec  # a name (or nothing): ModelConfig.validate names the valid ones
    return [int(i) for i in spec.split(",")]


def cmd_build_bank(args: argparse.Namespace) -> None:
    from memory3.memory.build import build_bank
    from memory3.memory.store import BankError

    try:
        build_bank(args.checkpoint, args.knowledge, args.out, embedder=args.embedder,
                   codec=args.codec, index=args.index,
                   min_relative_score=args.min_relative_score, batch_size=args.batch_size,
                   shard_memories=args.shard_memories, text_field=args.text_field,
                   tokenizer=args.tokenizer, device=args.device, shard_dir=args.shard_dir,
                   glob=args.glob, memory_layers=_layers(args.memory_layers),
                   memory_top_k=args.memory_top_k, progress=not args.no_progress)
    except BankError as e:  # memory3.cli reports its own error types; this one is ours
        print(f"memory3 build-bank: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        # A rank that exits with its process group alive can abort in c10d's threads
        # ("terminate called without an active exception") while the others still finish.
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    from memory3.config import ConfigError
    from memory3.data import DataError
    from memory3.checkpoints import CheckpointError

    parser = argparse.ArgumentParser(prog="memory3 build-bank", description=DESCRIPTION)
    _add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK is read from the environment.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    args = parser.parse_args(argv)
    try:
        cmd_build_bank(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"memory3 build-bank: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
