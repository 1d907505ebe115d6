"""`memory3 eval` and `memory3 generate`: a checkpoint with and without its memory bank."""
from __future__ import annotations

import argparse

from memory3.cliargs import (non_negative_float, non_negative_int, output_file, positive_int,
                             write_json)


def _load(args):
    import torch

    from memory3.checkpoints import load_model, load_tokenizer
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, recipe, info = load_model(args.checkpoint, device=device)
    tokenizer = load_tokenizer(args.checkpoint, args.tokenizer)
    bank = None
    if args.bank:
        from memory3.memory.bank import MemoryBank
        from memory3.memory.bank import checkpoint_encoder_id
        from memory3.memory.build import check_bank_tokenizer
        bank = MemoryBank.open(args.bank, verify="size")
        bank.check_model_config(recipe.model, f"checkpoint {args.checkpoint}")
        check_bank_tokenizer(bank, tokenizer, f"build a bank for checkpoint {args.checkpoint} "
                                              f"with `memory3 build-bank`")
        encoders = {e["id"] for e in bank.manifest["encoders"]}
        args.encode_now = checkpoint_encoder_id(args.checkpoint) not in encoders
        if args.encode_now:
            print(f"the memories in {args.bank} were encoded by other weights: encoding the "
                  f"retrieved references with {args.checkpoint} as they are read")
    return model, recipe, tokenizer, bank


def _modes(known):
    """argparse type: a comma list of modes from `known`."""
    def parse(text: str) -> list[str]:
        modes = [m for m in text.split(",") if m]
        unknown = [m for m in modes if m not in known]
        if unknown or not modes:
            what = f"unknown mode(s) {', '.join(unknown)}" if unknown else "no mode"
            raise argparse.ArgumentTypeError(f"{what} in {text!r}; choose from "
                                             f"{', '.join(known)}")
        return modes
    return parse


def _needs_bank(args) -> None:
    """Modes that read references need --bank: refused before the checkpoint is loaded."""
    if set(args.modes) - {"none"} and not args.bank:
        from memory3.memory.store import BankError
        raise BankError(f"--modes {','.join(sorted(set(args.modes) - {'none'}))} read "
                        f"references: pass --bank (a folder made by `memory3 build-bank`), or "
                        f"--modes none")


def _common(p):
    p.add_argument("--checkpoint", required=True, help="run dir or checkpoint folder")
    p.add_argument("--bank", help="memory bank folder (memory3 build-bank)")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the checkpoint's)")
    p.add_argument("--device", help="default: cuda if available, else cpu")


def add_eval_parser(sub):
    from memory3.data.text import GLOB_HELP, INPUTS_HELP
    p = sub.add_parser("eval", help="perplexity with and without memory, and with text RAG")
    _common(p)
    p.add_argument("--data", nargs="+", required=True, help=INPUTS_HELP)
    p.add_argument("--glob", action="append", default=None, metavar="PATTERN", help=GLOB_HELP)
    from memory3.eval.perplexity import MODES
    p.add_argument("--modes", default="none,memory,rag", type=_modes(MODES),
                   help="comma list of none, memory, rag, memory_own_chunk (an upper bound)")
    p.add_argument("--seq-len", type=positive_int, help="default: the checkpoint's data.seq_len")
    p.add_argument("--max-sequences", type=positive_int, default=64)
    p.add_argument("--context", type=non_negative_int, default=0, metavar="N",
                   help="sliding-window perplexity: sequences overlap by N tokens and each one's "
                        "first N are context only, so every token is scored once, after at least "
                        "N tokens of its text; N = the chunk length (64) scores only tokens whose "
                        "chunk reads memory (a sequence's first chunk has nothing to retrieve "
                        "with). Default 0: sequences back to back, every token scored")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--text-field", default="text",
                   help="JSON Lines field or Parquet column holding the text")
    p.add_argument("--copy-probe", type=non_negative_int, default=0, metavar="LENGTH",
                   help="also run the copy probe (eval/copying.py) on the first LENGTH tokens of "
                        "up to 64 documents of --data, each fed twice: loss on the second copy "
                        "vs the first (whether the model uses its context at all); for a model "
                        "with memory layers and LENGTH < reference_len, also through memory: "
                        "each span read as its own memory, sparse and dense")
    p.add_argument("--json", type=output_file, help="write the results here")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args):
    from memory3.eval.perplexity import evaluate, text_sequences, trained_with_memory
    _needs_bank(args)
    model, recipe, tokenizer, bank = _load(args)
    if args.seq_len and args.seq_len > recipe.model.max_seq_len:
        from memory3.checkpoints import CheckpointError
        raise CheckpointError(f"--seq-len {args.seq_len} is longer than checkpoint "
                              f"{args.checkpoint} reads (model.max_seq_len "
                              f"{recipe.model.max_seq_len})")
    seqs = text_sequences(args.data, tokenizer, args.seq_len or recipe.data.seq_len,
                          max_sequences=args.max_sequences, text_field=args.text_field,
                          glob=args.glob, context=args.context)
    print(f"{len(seqs)} sequences of {seqs.shape[1] - 1} tokens from {', '.join(args.data)}"
          + (f", scored after their first {args.context}" if args.context else ""))
    results = evaluate(model, tokenizer, seqs, args.modes, bank=bank,
                       batch_size=args.batch_size, encode_now=bool(args.bank and args.encode_now),
                       reads_sink=trained_with_memory(recipe), context=args.context,
                       progress=True)
    if args.copy_probe:
        from memory3.data import iter_documents
        from memory3.eval.copying import copy_probe, document_spans
        docs = (tokenizer.encode(d.text) for d in iter_documents(
            args.data, text_field=args.text_field, glob=args.glob))
        spans = document_spans(docs, args.copy_probe, max_spans=64)
        if not spans:
            raise SystemExit(f"--copy-probe: no document of {', '.join(args.data)} has "
                             f"{args.copy_probe} tokens")
        results["copy_probe"] = probe = copy_probe(model, spans, tokenizer.bos_id)
        print(f"copy probe ({probe['spans']} spans of {probe['length']} tokens): loss "
              f"{probe['first_copy_loss']:.3f} on the first copy, {probe['second_copy_loss']:.3f} "
              f"on the second (ratio {probe['ratio']:.3f})")
        if model.cfg.memory_layer_ids and args.copy_probe < model.cfg.reference_len:
            results["memory_copy_probe"] = _memory_copy_probe(model, spans, tokenizer.bos_id)
    if args.json:
        write_json(args.json, results)
        print(f"wrote {args.json}")


def _memory_copy_probe(model, spans, bos_id: int) -> dict:
    """The copy probe through memory, at the model's memory_top_k and dense: what the read path
    gets from a memory holding every token, and what the sparse selection keeps of it."""
    from memory3.eval.copying import memory_copy_probe
    out = {}
    for name, top_k in (("sparse", None), ("dense", model.cfg.reference_len - 1)):
        out[name] = p = memory_copy_probe(model, spans, bos_id, top_k=top_k)
        print(f"memory copy probe, {name} (top_k {p['top_k']}): loss {p['memory_loss']:.3f} "
              f"reading the span's own memory, {p['alone_loss']:.3f} without (ratio "
              f"{p['ratio']:.3f})")
    return out


def add_generate_parser(sub):
    p = sub.add_parser("generate", help="generate text, retrieving memories every chunk")
    _common(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--mode", choices=["memory", "rag", "rag_once"], default="memory",
                   help="read the retrieved references as memories, or as text in front of the "
                        "context (rag: same references, cache rebuilt every chunk; rag_once: "
                        "references retrieved once with the prompt, then plain decoding)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=positive_int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=output_file, help="write text and provenance here")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args):
    from dataclasses import asdict

    from memory3.eval.perplexity import trained_with_memory
    from memory3.generate import generate
    model, recipe, tokenizer, bank = _load(args)
    # Without a bank, a model trained with memory still reads its sink, as in `eval --modes none`.
    out = generate(model, tokenizer, args.prompt, bank=bank, mode=args.mode,
                   max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                   encode_now=bool(args.bank and args.encode_now),
                   reads_sink=trained_with_memory(recipe))
    print(args.prompt + out.text)
    for r in out.retrievals:
        print(f"\n[chunk {r.chunk}, after {r.position} tokens] retrieved:")
        for ref in r.references:
            print(f"  row {ref['row']} ({ref['doc_id']} tokens {ref['start']}-{ref['end']}): "
                  f"{ref['text'][:100]!r}")
    if args.json:
        write_json(args.json, asdict(out))


def add_lm_eval_parser(sub):
    p = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks without memory, with memory "
                                       "and with text RAG",
                       description="Score lm-evaluation-harness tasks (needs `pip install "
                                   "'memory3[eval]'`) in each mode; memories are read as in "
                                   "`memory3 eval` (causal retrieval per chunk).")
    _common(p)
    p.add_argument("--tasks", required=True,
                   help="comma list of lm_eval task names (e.g. hellaswag,arc_easy)")
    p.add_argument("--modes", default="none,memory,rag", help="comma list of none, memory, rag")
    p.add_argument("--include-path", help="folder of extra lm_eval task YAML files")
    p.add_argument("--limit", type=float,
                   help="examples per task (a fraction if below 1); for quick checks only")
    p.add_argument("--num-fewshot", type=int, help="default: each task's own")
    p.add_argument("--bootstrap-iters", type=int, default=100_000,
                   help="resamples for the standard errors of non-mean metrics (lm_eval's "
                        "default; lower is faster)")
    p.add_argument("--json", required=True, type=output_file,
                   help="write every task's metrics per mode here")
    p.set_defaults(func=cmd_lm_eval)


def cmd_lm_eval(args):
    from memory3.eval.perplexity import trained_with_memory
    modes = [m for m in args.modes.split(",") if m]
    known = ("none", "memory", "rag")
    if not modes or set(modes) - set(known):
        raise SystemExit(f"memory3 lm-eval: --modes {args.modes!r}: choose from {list(known)}")
    if set(modes) - {"none"} and not args.bank:
        raise SystemExit(f"memory3 lm-eval: --modes {sorted(set(modes) - {'none'})} need --bank")
    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks:
        raise SystemExit("memory3 lm-eval: --tasks names no task")
    try:
        from memory3.eval.harness import run_tasks
    except ImportError as e:  # lm_eval is an optional extra
        raise SystemExit(f"memory3 lm-eval needs lm-evaluation-harness ({e}): "
                         f"pip install 'memory3[eval]'") from e
    model, recipe, tokenizer, bank = _load(args)
    results = run_tasks(model, tokenizer, tasks, modes, bank=bank,
                        reads_sink=trained_with_memory(recipe),
                        encode_now=bool(args.bank and args.encode_now),
                        include_path=args.include_path, limit=args.limit,
                        num_fewshot=args.num_fewshot, bootstrap_iters=args.bootstrap_iters)
    for mode, by_task in results.items():
        for task, metrics in by_task.items():
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                              if isinstance(v, float) and "stderr" not in k)
            print(f"{mode:>6} {task}: {shown}")
    from importlib.metadata import version
    report = {"checkpoint": str(args.checkpoint), "bank": args.bank, "tasks": tasks,
              "lm_eval_version": version("lm_eval"),
              "limit": args.limit, "num_fewshot": args.num_fewshot, "modes": results}
    write_json(args.json, report)
    print(f"wrote {args.json}")
