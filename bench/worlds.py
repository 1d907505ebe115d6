"""The generated world as benchmark input: corpus shards, and a knowledge base whose documents
join several fact sheets, so references are ~100 tokens long like real ones (a single sheet is ~30)."""
from __future__ import annotations

import json
from pathlib import Path

from memory3.data import prepare_data, train_tokenizer
from memory3.data.synthetic import make_world, write_world


def world_inputs(root: Path, n_entities: int, facts_per_doc: int, vocab_size: int
                 ) -> tuple[dict[str, Path], Path, Path]:
    """(the world's files, the joined knowledge.jsonl, token shards of the corpus) under root."""
    root.mkdir(parents=True, exist_ok=True)
    files = write_world(make_world(seed=0, n_entities=n_entities), root / "world")
    records = [json.loads(line) for line in files["knowledge"].read_text().splitlines()]
    groups = [records[i:i + facts_per_doc] for i in range(0, len(records), facts_per_doc)]
    knowledge = root / "knowledge.jsonl"
    knowledge.write_text("".join(json.dumps({"text": " ".join(r["text"] for r in g)}) + "\n"
                                 for g in groups))
    tok = train_tokenizer([files["corpus"]], root / "tokenizer", vocab_size, progress=False)
    prepare_data([files["corpus"]], tok.path, root / "shards", valid_fraction=0.01, progress=False)
    return files, knowledge, root / "shards"
