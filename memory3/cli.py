"""The `memory3` command: one subcommand per job of the pipeline."""
from __future__ import annotations

import argparse
import json
import os
import sys

from memory3.cliargs import positive_int


def _add_train(sub):
    p = sub.add_parser("train", help="pretrain from a recipe (alone or under deepspeed/torchrun)",
                       description="Train from a recipe. Overrides are section.field=value, e.g. "
                                   "data.path=shards train.max_steps=100 model.n_layers=4.")
    p.add_argument("--recipe", required=True, help="shipped recipe name or a .toml/.json file")
    p.add_argument("--out", help="run directory (default: runs/<recipe name>)")
    p.add_argument("--dry-run", action="store_true",
                   help="build the model on the meta device and print its size, the memory it "
                        "needs per rank and the DeepSpeed config; trains nothing")
    p.add_argument("--world-size", type=int, default=None,
                   help="ranks to size the --dry-run for (default: WORLD_SIZE or 1)")
    p.add_argument("--no-resume", action="store_true",
                   help="start from scratch even if the run directory has checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="section.field=value")
    p.set_defaults(func=cmd_train)


def cmd_train(args):
    from memory3.config import Recipe

    recipe = Recipe.from_name(args.recipe).override(args.overrides).with_absolute_paths()
    if args.dry_run:
        if recipe.train.init_from.startswith("hf:"):
            from memory3.hf.llama_import import recipe_for
            recipe, _ = recipe_for(recipe)  # size the imported Llama's shape
        from memory3.train.dry_run import dry_run, format_report
        from memory3.train.phases import fit_vocab_to_data
        recipe, vocab_note = fit_vocab_to_data(recipe)  # size the vocabulary training would build
        if vocab_note:
            print(vocab_note)
        world = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
        print(format_report(dry_run(recipe, world)))
        return
    from memory3.train.trainer import train
    out = args.out or os.path.join("runs", recipe.name)
    result = train(recipe, out, resume=not args.no_resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v
                          for k, v in result.items()}))
    import torch.distributed as dist
    if dist.is_initialized():  # leave the group cleanly so no rank aborts at exit
        dist.destroy_process_group()


def _add_inputs(p):
    from memory3.data.text import GLOB_HELP, INPUTS_HELP
    p.add_argument("inputs", nargs="+", help=INPUTS_HELP)
    p.add_argument("--glob", action="append", default=None, metavar="PATTERN", help=GLOB_HELP)
    p.add_argument("--text-field", default="text",
                   help="JSON Lines field or Parquet column holding the text")


def _add_train_tokenizer(sub):
    p = sub.add_parser("train-tokenizer", help="train a sentencepiece BPE tokenizer on text")
    _add_inputs(p)
    p.add_argument("--out", required=True, help="folder to write tokenizer.model into")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--max-sentences", type=int, default=2_000_000)
    p.set_defaults(func=cmd_train_tokenizer)


def cmd_train_tokenizer(args):
    from memory3.data import train_tokenizer
    tok = train_tokenizer(args.inputs, args.out, args.vocab_size, text_field=args.text_field,
                          max_sentences=args.max_sentences, glob=args.glob)
    print(f"tokenizer with {tok.vocab_size} tokens written to {tok.path}")


def _add_prepare_data(sub):
    p = sub.add_parser("prepare-data", help="tokenize text into token shards (resumable)")
    _add_inputs(p)
    p.add_argument("--tokenizer", required=True, help="tokenizer.model or its folder")
    p.add_argument("--out", required=True, help="folder for shards and manifest.json")
    p.add_argument("--shard-tokens", type=positive_int, default=2**24)
    p.add_argument("--valid-fraction", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0, help="seed of the train/valid document split")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="tokenization threads (default: every core); the shards are the same "
                        "bytes whatever the count")
    p.set_defaults(func=cmd_prepare_data)


def cmd_prepare_data(args):
    from memory3.data import prepare_data
    prepare_data(args.inputs, args.tokenizer, args.out, shard_tokens=args.shard_tokens,
                 valid_fraction=args.valid_fraction, text_field=args.text_field, seed=args.seed,
                 glob=args.glob, workers=args.workers)


def _add_quickstart(sub):
    p = sub.add_parser("quickstart", help="the whole pipeline on a built-in corpus, on CPU")
    p.add_argument("--out", default="quickstart", help="everything is written under this folder")
    p.add_argument("--steps", type=int, default=None, help="warmup steps (default: the recipe's)")
    p.add_argument("--continual-steps", type=int, default=None,
                   help="continual training steps (default: the recipe's)")
    p.set_defaults(func=cmd_quickstart)


def cmd_quickstart(args):
    from memory3.quickstart import quickstart
    quickstart(args.out, steps=args.steps, continual_steps=args.continual_steps)


def build_parser() -> argparse.ArgumentParser:
    from memory3.eval.cli import add_eval_parser, add_generate_parser, add_lm_eval_parser
    from memory3.hf.cli import add_export_parser, add_import_parser
    from memory3.memdec.cli import add_memdec_parser
    from memory3.memory.cli import add_bank_parser, add_build_bank_parser

    parser = argparse.ArgumentParser(prog="memory3", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_quickstart, _add_train_tokenizer, _add_prepare_data, _add_train,
                add_build_bank_parser, add_bank_parser, add_eval_parser, add_lm_eval_parser,
                add_generate_parser, add_memdec_parser, add_export_parser, add_import_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None):
    from memory3.config import ConfigError
    from memory3.data import DataError
    from memory3.hf import HFError
    from memory3.memory.store import BankError
    from memory3.checkpoints import CheckpointError
    from memory3.files import no_space_message, out_of_space

    argv = sys.argv[1:] if argv is None else argv
    # The deepspeed launcher appends --local_rank=N; we read LOCAL_RANK from the environment.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, DataError, CheckpointError, BankError, HFError) as e:
        print(f"memory3 {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # out of space where no job's own error type says so: still one line
        if not out_of_space(e):
            raise
        print(f"memory3 {args.command}: error: {no_space_message(e.filename or '?', e)}",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
