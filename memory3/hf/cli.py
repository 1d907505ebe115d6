"""`memory3 export` and `memory3 import-hf`: Hugging Face folders out and in."""
from __future__ import annotations


def add_export_parser(sub):
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face Llama folder",
                       description="Write config.json, model.safetensors and a tokenizer that "
                                   "AutoModelForCausalLM / AutoTokenizer load, plus memory3.json "
                                   "(memory settings, recipe, provenance) so that memory3 "
                                   "commands read the folder back.")
    p.add_argument("--checkpoint", required=True, help="run dir or checkpoint folder")
    p.add_argument("--out", required=True, help="folder to write (must be empty or absent)")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the checkpoint's)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_export)


def cmd_export(args):
    from memory3.hf.export import export_checkpoint
    out = export_checkpoint(args.checkpoint, args.out, force=args.force, tokenizer=args.tokenizer)
    print(f"wrote {out} (AutoModelForCausalLM.from_pretrained({str(out)!r}) loads it)")


def add_import_parser(sub):
    p = sub.add_parser("import-hf", help="a Hugging Face Llama folder in memory3's layout",
                       description="Convert a Hugging Face Llama (config.json, safetensors, "
                                   "sentencepiece tokenizer.model) into an exported folder with "
                                   "our special token ids (<ref> added when missing). Tokenize "
                                   "training data with OUT/tokenizer.model; train from it with "
                                   "train.init_from=hf:HF_DIR (or =OUT).")
    p.add_argument("hf_dir", help="Hugging Face model folder")
    p.add_argument("--out", required=True, help="folder to write (must be empty or absent)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_import)


def cmd_import(args):
    from memory3.hf.llama_import import import_hf
    out = import_hf(args.hf_dir, args.out, force=args.force)
    print(f"wrote {out}; tokenize data with --tokenizer {out}")
