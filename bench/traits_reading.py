"""Does a model learn to read a registry of people's traits from memory? (issue 11, quickstart)

The world of memory3.data.traits: 32 traits per person, each one of 12 words, stated in a fixed
order ("Nenobo has fruit peach tree elm ..."), so that ~60% of the held-out loss is values only
the bank holds. Stages, each resumed when its output exists:

  1. world, tokenizer (from warmup and continual text), shards
  2. warmup (`tiny-warmup` + overrides); then the in-context probe: loss of the text's values with
     the person's records in front of the text and without (does the model look values up in its
     context at all? reading memory is the same lookup, at layer 0, over kept tokens)
  3. bank of the knowledge base, encoded by the warmup model
  4. continual training (`tiny-continual` + overrides, 5 references from the previous chunk)
  5. held-out perplexity in modes none / memory / rag, and the loss of the value tokens after
     chunk 0 (chunk 0 reads nothing) in modes none / memory / own (references retrieved with the
     chunk itself: the non-causal upper bound)

    python bench/traits_reading.py bench_runs/traits --token-shift --labelled --warm-steps 1000
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quickstart_losses import mode_losses  # noqa: E402

from memory3.config import Recipe  # noqa: E402
from memory3.data import Tokenizer, prepare_data, train_tokenizer  # noqa: E402
from memory3.data.traits import (INTROS, TRAITS, VALUES, person_records, person_text,  # noqa: E402
                                 write_traits)
from memory3.eval.perplexity import evaluate, text_sequences  # noqa: E402
from memory3.memory.bank import MemoryBank  # noqa: E402
from memory3.memory.build import build_bank  # noqa: E402
from memory3.memory.encoder import MemoryEncoder  # noqa: E402
from memory3.memory.reading import encode_distinct  # noqa: E402
from memory3.train.checkpoint import load_model  # noqa: E402
from memory3.train.trainer import train  # noqa: E402

COMMON = ["data.seq_len=256", "train.micro_batch_size=16", "train.eval_every=100"]


def value_positions(tok: Tokenizer, ids: list[int]) -> list[int]:
    """Indices j of ids whose token is a value word right after its trait word."""
    pieces = [tok.decode([t]).strip() for t in ids]
    return [j for j in range(1, len(ids))
            if pieces[j - 1] in TRAITS and pieces[j] in VALUES[pieces[j - 1]]]


@torch.no_grad()
def in_context_probe(model, tok: Tokenizer, labelled: bool, n_records: int = 4,
                     n: int = 16, intro: str = "", named: bool = True) -> dict[str, float]:
    """Mean loss of the text's values for made-up people, with their records in front or not."""
    rng = random.Random(5)
    out = {"records_in_front": [], "text_alone": []}
    for _ in range(n):
        name = "".join(rng.choice(["ba", "ko", "ri", "te", "mu", "sa"]) for _ in range(3)).title()
        values = {t: rng.choice(v) for t, v in VALUES.items()}
        text = person_text(name, values)
        opening = INTROS[intro].format(name=name) + " " if intro else ""
        for key, prefix in (("records_in_front", " ".join(person_records(
                name, values, n_records, labelled, named)) + ". "), ("text_alone", "")):
            ids = [tok.bos_id] + tok.encode(opening + prefix + text)
            x = torch.tensor([ids])
            loss = F.cross_entropy(model(x[:, :-1]).logits[0].float(), x[0, 1:], reduction="none")
            start = len(ids) - len(tok.encode(text))
            out[key] += [loss[j - 1].item() for j in value_positions(tok, ids) if j >= start]
    return {k: round(sum(v) / len(v), 3) for k, v in out.items()}


def people_at(tok: Tokenizer, ids: list[int]) -> list[str | None]:
    """Per token, the person the text is about there (the last name before it that opens a
    sentence, "Name has ..." or "... entry of Name")."""
    ends = [len(tok.decode(ids[:j + 1])) for j in range(len(ids))]
    text = tok.decode(ids)
    starts = [(m.start(), m.group(1) or m.group(2)) for m in re.finditer(
        r"\b([A-Z][a-z]+) has\b|entry of ([A-Z][a-z]+)", text)]
    out, i, name = [], 0, None
    for end in ends:
        while i < len(starts) and starts[i][0] < end:
            name = starts[i][1]
            i += 1
        out.append(name)
    return out


def value_losses(model, tok: Tokenizer, bank, sequences: torch.Tensor,
                 owners: list[str]) -> dict[str, float]:
    """Mean loss of the value tokens after chunk 0, in modes none / memory / own; and for causal
    reads, the share of those tokens whose chunk read a record of their person (`person_read`)
    and, of those, the share whose value the first memory layer kept in some KV head (`kept`),
    with the losses none / memory of each kind; `person_in_previous_chunk`: the share whose
    person the chunk before mentions at all, the most any causal retrieval can read.
    owners[i]: the person of knowledge line i."""
    x, y = sequences[:, :-1], sequences[:, 1:]
    L = model.cfg.chunk_len
    losses, rows = mode_losses(model, tok, bank, x, y)
    # Each record the causal reads hold, encoded once: its person and the values layer 0 keeps.
    distinct, _, memories = encode_distinct(MemoryEncoder(model), bank, rows["memory"])
    kept_of = {}
    for row, record, pos in zip(distinct.tolist(), bank.references(distinct),
                                memories.positions[:, 0]):                # (G, K), layer 0
        kept = set(pos.flatten().tolist())  # positions count the reference-BOS as 0
        kept_of[row] = (owners[int(record.doc_id.rsplit("#", 1)[1])],
                        {tok.decode([record.tokens[j]]).strip()
                         for j in value_positions(tok, list(record.tokens)) if j + 1 in kept})

    where, kinds, in_previous = [], [], 0
    for b in range(len(y)):
        ids = y[b].tolist()
        people = people_at(tok, ids)
        for j in value_positions(tok, ids):
            if j < L:
                continue
            read = [kept_of[int(r)] for r in rows["memory"][b, j // L] if r >= 0]
            value = tok.decode([ids[j]]).strip()
            mine = [words for person, words in read if person == people[j]]
            in_previous += people[j] in people[j // L * L - L:j // L * L]
            where.append((b, j))
            kinds.append("not_read" if not mine else
                         "kept" if any(value in words for words in mine) else "not_kept")
    out = {mode: round(sum(loss[b, j].item() for b, j in where) / len(where), 3)
           for mode, loss in losses.items()}
    out["tokens"] = len(where)
    out["person_in_previous_chunk"] = round(in_previous / len(where), 3)
    out["person_read"] = round(sum(k != "not_read" for k in kinds) / len(kinds), 3)
    out["kept"] = round(kinds.count("kept") / max(1, len(kinds) - kinds.count("not_read")), 3)
    for kind in ("kept", "not_kept", "not_read"):
        at = [w for w, k in zip(where, kinds) if k == kind]
        out[f"{kind} none/memory"] = [round(sum(losses[m][w].item() for w in at)
                                            / max(1, len(at)), 3) for m in ("none", "memory")]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--labelled", action="store_true", help="records hold 'trait value' pairs")
    p.add_argument("--records", type=int, default=4, help="records per person")
    p.add_argument("--intro", choices=sorted(INTROS), default="",
                   help="each person's text opens with these sentences (traits.INTROS)")
    p.add_argument("--unnamed", action="store_true", help="records without ' of Name'")
    p.add_argument("--no-preamble", action="store_true",
                   help="warmup text without the person's records in front")
    p.add_argument("--token-shift", action="store_true")
    p.add_argument("--warm-steps", type=int, default=1000)
    p.add_argument("--continual-steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--model", nargs="*", default=[], help="model.* overrides")
    p.add_argument("--warm", nargs="*", default=[], help="extra warmup overrides")
    p.add_argument("--continual", nargs="*", default=[], help="extra continual overrides")
    p.add_argument("--tag", default="continual")
    args = p.parse_args(argv)
    out, t0 = Path(args.out), time.time()
    model = [*args.model, *(["model.token_shift=true"] if args.token_shift else [])]
    data = write_traits(out / "world", n_train=args.n_train, n_records=args.records,
                        labelled=args.labelled, preamble=not args.no_preamble,
                        intro=args.intro, named=not args.unnamed)
    tok = (Tokenizer(out / "tokenizer") if (out / "tokenizer" / "tokenizer.model").exists()
           else train_tokenizer([data["warm"], data["train"]], out / "tokenizer", 2048,
                                progress=False))
    for split in ("warm", "train"):
        if not (out / f"shards_{split}").exists():
            prepare_data([data[split]], tok.path, out / f"shards_{split}", valid_fraction=0.02,
                         progress=False)
    common = [*COMMON, f"optim.lr={args.lr}", *model]
    train(Recipe.from_name("tiny-warmup").override(
        [*common, f"data.path={out / 'shards_warm'}", f"train.max_steps={args.warm_steps}",
         f"train.save_every={args.warm_steps}", *args.warm]), out / "warmup", progress=False)
    warm = load_model(out / "warmup")[0].eval()
    probe = in_context_probe(warm, tok, args.labelled, args.records, intro=args.intro,
                             named=not args.unnamed)
    print(json.dumps({"in_context_probe": probe}), flush=True)
    if not (out / "bank").exists():
        build_bank(out / "warmup", [data["knowledge"]], out / "bank", embedder="hashing:2048",
                   progress=False)
    train(Recipe.from_name("tiny-continual").override(
        [*common, f"data.path={out / 'shards_train'}", f"continual.bank={out / 'bank'}",
         f"train.init_from={out / 'warmup'}", f"train.max_steps={args.continual_steps}",
         "train.save_every=100", "schedule.warmup_steps=20", "continual.new_per_chunk=5",
         "continual.previous_chunks=1", *args.continual]), out / args.tag, progress=False)
    model_, _, _ = load_model(out / args.tag)
    model_.eval()
    bank = MemoryBank.open(out / "bank")
    sequences = text_sequences([data["heldout"]], tok, 256, max_sequences=32)
    owners = [json.loads(line)["id"].rsplit("-", 1)[0].capitalize()
              for line in open(data["knowledge"])]
    ppl = evaluate(model_, tok, sequences, ("none", "memory", "rag"), bank=bank, encode_now=True,
                   reads_sink=True)
    result = {"tag": args.tag, "in_context_probe": probe,
              **{f"ppl_{m}": round(r["perplexity"], 3) for m, r in ppl.items()},
              "ppl_memory/none": round(ppl["memory"]["perplexity"] / ppl["none"]["perplexity"], 3),
              "value_loss_after_chunk0": value_losses(model_, tok, bank, sequences, owners),
              "seconds": round(time.time() - t0)}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
