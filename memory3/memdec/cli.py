"""`memory3 memdec ...`: build a datastore, build kNN targets, evaluate (training is
`memory3 train --recipe memdec-tiny` / `memdec-small`).

`add_memdec_parser(subparsers)` adds the `memdec` subcommand to the main `memory3` parser. Running
this module (`python -m memory3.memdec.cli memdec ...`) gives the same subcommand on its own.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_memdec_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("memdec", help="Memory Decoder and kNN-LM: datastore, targets, eval",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="memdec_command", required=True)
    _add_build_datastore(sub)
    _add_build_targets(sub)
    _add_eval(sub)
    return p


def _add_build_datastore(sub):
    p = sub.add_parser("build-datastore", help="(key, next token) of every domain position + "
                       "FAISS index (resumable)")
    p.add_argument("--base", required=True, help="base model checkpoint (run dir or step dir)")
    p.add_argument("--data", required=True, help="domain token shards (memory3 prepare-data "
                   "with the base's tokenizer)")
    p.add_argument("--out", required=True, help="datastore folder")
    p.add_argument("--split", default="train", help="split of --data to store (default: train)")
    p.add_argument("--max-tokens", type=int, default=None, help="store only the first N positions")
    p.add_argument("--window", type=int, default=None,
                   help="tokens per forward window (default: the base's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    p.add_argument("--index", choices=["auto", "flat", "ivfpq"], default="auto",
                   help="auto: Flat up to 2^17 positions, IVF-PQ above")
    p.add_argument("--nlist", type=int, default=None,
                   help="IVF lists (default: min(4096, 4 sqrt(N)))")
    p.add_argument("--code-bytes", type=int, default=64, help="IVF-PQ bytes per key (default 64)")
    p.add_argument("--nprobe", type=int, default=32, help="IVF lists searched (default 32)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_build_datastore)


def cmd_build_datastore(args):
    from memory3.memdec.datastore import build_datastore
    store = build_datastore(args.base, args.data, args.out, split=args.split,
                            max_tokens=args.max_tokens, window=args.window,
                            batch_size=args.batch_size, index=args.index, nlist=args.nlist,
                            code_bytes=args.code_bytes, nprobe=args.nprobe,
                            progress=not args.no_progress)
    print(f"datastore {store.path}: {store.positions:,} positions, {store.key_dim}-dim keys, "
          f"{store.manifest['index']['kind']} index")


def _add_build_targets(sub):
    p = sub.add_parser("build-targets", help="sparse kNN next-token distribution of every "
                       "datastore position (resumable)")
    p.add_argument("--datastore", required=True)
    p.add_argument("--out", required=True, help="targets folder")
    p.add_argument("--k", type=int, default=1024, help="neighbours per position (default 1024)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="p_kNN = softmax(-squared L2 distance / temperature) (default 1)")
    p.add_argument("--no-exclude-self", action="store_true",
                   help="keep each position's own entry among its neighbours")
    p.add_argument("--top", type=int, default=32,
                   help="tokens kept per position, renormalised (default 32)")
    p.add_argument("--exact-distances", action="store_true",
                   help="recompute distances from the stored keys (IVF-PQ's are approximate)")
    p.add_argument("--batch-size", type=int, default=4096, help="queries per search (and commit)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_build_targets)


def cmd_build_targets(args):
    from memory3.memdec.targets import build_targets
    targets = build_targets(args.datastore, args.out, k=args.k, temperature=args.temperature,
                            exclude_self=not args.no_exclude_self, top=args.top,
                            exact=args.exact_distances, batch_size=args.batch_size,
                            progress=not args.no_progress)
    print(f"targets {targets.path}: {targets.positions:,} positions, top {targets.top}, "
          f"mean kNN mass kept {targets.manifest['mass_kept_mean']:.3f}")


def _add_eval(sub):
    p = sub.add_parser("eval", help="perplexity and tokens/s of bases alone, with kNN-LM and "
                       "with a Memory Decoder")
    p.add_argument("--base", action="append", required=True,
                   help="base checkpoint; repeat for several bases sharing the tokenizer")
    p.add_argument("--decoder", default=None, help="Memory Decoder checkpoint")
    p.add_argument("--data", required=True, help="held-out token shards (memory3 prepare-data; "
                   "for a held-out text file use --valid-fraction 0 and --split train)")
    p.add_argument("--split", default="valid", help="split of --data (default: valid)")
    p.add_argument("--lambda", dest="lam", type=float, default=0.6,
                   help="decoder weight: p = lambda p_dec + (1 - lambda) p_base (default 0.6)")
    p.add_argument("--knn-datastore", default=None, help="also evaluate kNN-LM on this datastore")
    p.add_argument("--knn-lambda", type=float, default=0.25)
    p.add_argument("--knn-k", type=int, default=1024)
    p.add_argument("--knn-temperature", type=float, default=1.0)
    p.add_argument("--knn-exact", action="store_true",
                   help="recompute kNN distances from the stored keys")
    p.add_argument("--window", type=int, default=None,
                   help="tokens per window (default: the smallest max_seq_len involved)")
    p.add_argument("--stride", type=int, default=None,
                   help="scored tokens per window (default: window / 2; the rest is context)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="instead of sliding windows, cut the stream as `memory3 eval --seq-len` "
                        "cuts held-out text: rows of SEQ_LEN + 1 tokens, each scored from its "
                        "own start (the same tokens and contexts as its modes)")
    p.add_argument("--max-sequences", type=int, default=None,
                   help="with --seq-len: score at most N rows (as `memory3 eval`)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--batch-size", type=int, default=8, help="windows (or rows) per forward")
    p.add_argument("--json", default=None, help="write the results (a JSON list) here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args):
    from memory3.memdec.evaluate import evaluate, format_table
    results = evaluate(args.base, args.data, split=args.split, decoder=args.decoder, lam=args.lam,
                       knn_datastore=args.knn_datastore, knn_lambda=args.knn_lambda,
                       knn_k=args.knn_k, knn_temperature=args.knn_temperature,
                       knn_exact=args.knn_exact, window=args.window, stride=args.stride,
                       seq_len=args.seq_len, max_sequences=args.max_sequences,
                       max_tokens=args.max_tokens, batch_size=args.batch_size,
                       progress=not args.no_progress)
    print(format_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


def main(argv: list[str] | None = None):
    """`python -m memory3.memdec.cli memdec ...`, with the same error handling as `memory3`."""
    from memory3.config import ConfigError
    from memory3.data import DataError
    from memory3.checkpoints import CheckpointError

    parser = argparse.ArgumentParser(prog="memory3")
    add_memdec_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        args.func(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"memory3 {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
