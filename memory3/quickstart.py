"""`memory3 quickstart`: the pipeline end to end on the built-in corpus, on a CPU.

Every file it writes goes under one folder: the generated corpus, the tokenizer, token shards,
the warmup run (checkpoints + metrics.jsonl). Re-running resumes rather than redoing.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from memory3.config import Recipe
from memory3.data import Tokenizer, prepare_data, train_tokenizer
from memory3.data.synthetic import make_world, write_world
from memory3.train.checkpoint import load_model
from memory3.train.trainer import train

RECIPE = "mini-warmup"
VOCAB_SIZE = 2048
PROMPTS = ["The city of", "Every morning,"]


def _stage(title: str):
    print(f"\n== {title}", flush=True)


def quickstart(out: str | Path = "quickstart", steps: int | None = None) -> dict:
    out = Path(out)
    start = time.time()

    _stage("1/5 corpus: a generated world of people, cities, rivers and their facts")
    files = write_world(make_world(seed=0), out / "corpus")
    print(f"wrote {', '.join(str(p) for p in files.values())}")

    _stage("2/5 tokenizer: sentencepiece BPE")
    tok_dir = out / "tokenizer"
    tokenizer = (Tokenizer(tok_dir) if (tok_dir / "tokenizer.model").exists()
                 else train_tokenizer([files["corpus"]], tok_dir, VOCAB_SIZE, progress=False))
    print(f"{tokenizer.vocab_size} tokens in {tokenizer.path}")

    _stage("3/5 token shards")
    prepare_data([files["corpus"]], tokenizer.path, out / "data", valid_fraction=0.02)

    _stage(f"4/5 warmup pretraining (recipe {RECIPE}, DeepSpeed on CPU)")
    overrides = [f"data.path={out / 'data'}"] + ([f"train.max_steps={steps}"] if steps else [])
    recipe = Recipe.from_name(RECIPE).override(overrides)
    result = train(recipe, out / "warmup")

    _stage("5/5 sample generations from the last checkpoint")
    model, _, info = load_model(out / "warmup")
    torch.manual_seed(0)
    for prompt in PROMPTS:
        ids = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(prompt)])
        new = model.generate(ids, 40, temperature=0.8, top_k=40, eos_id=tokenizer.eos_id)
        print(f"  {prompt!r} -> {tokenizer.decode(new[0, 1:].tolist())!r}")

    ppl = result.get("val_ppl")
    print(f"\nvalidation perplexity after {info['step']} steps: "
          f"{ppl:.2f}" if ppl else "\nno validation split")
    print(f"done in {time.time() - start:.0f}s; everything is under {out}/")
    return result
