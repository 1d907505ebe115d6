"""Bad inputs to the `memory3` commands and what each must get (issue 14 section 4): one list, run
as tests by tests/test_bad_inputs.py and tabled by bench/bad_inputs.py.

Every case runs the real command (`python -m memory3 ...`) in a fresh process, from a folder of
real fixtures (`build_fixtures`: a generated world, real sentencepiece tokenizers, token shards,
trained tiny checkpoints and memory banks), with its paths relative to that folder, so the table's
command is what was run. A case's `prepare` writes its bad input into the folder (under a name of
its own) and returns the arguments; the command must exit with `exit`, print no traceback, and
print a line matching `message` (stderr for an error, stdout for exit 0), which names the file or
field at fault and what was expected. `untouched` lists outputs that existed before the command
and must be byte-identical after it (bad input never damages what is already written).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REFERENCE_LEN = 128  # the tiny preset's model.reference_len


@dataclass(frozen=True)
class Case:
    id: str
    input: str                                  # the bad input, in words (the table's first column)
    prepare: Callable[[Path], list[str]]        # writes the input under root; the argv after memory3
    exit: int
    message: str                                # regex, searched line by line
    untouched: tuple[str, ...] = ()             # paths under root that must not change
    check: Callable[[Path, subprocess.CompletedProcess], None] | None = None  # more for exit 0
    slow: bool = False                          # deselected by default (pytest -m slow)
    gap: str | None = None                      # a known gap: the message is not yet the one wanted


# -- fixtures ---------------------------------------------------------------------------------
def build_fixtures(root: Path) -> Path:
    """Everything the cases read, under root (seconds on a CPU):
    corpus/{corpus.txt,knowledge.jsonl,heldout.txt}  a generated world
    tokenizer/            512 tokens, the data's    tokenizer-other/  400 tokens, another one
    tokenizer-700/        700 tokens (more than the tiny model's vocab_size 512)
    shards/               prepared with tokenizer/  run/  2 warmup steps of tiny-warmup on shards/
    run-other-shape/      1 step of tiny-warmup with model.d_mlp=96 (the preset's is 128)
    bank/                 the world's knowledge encoded by run/
    bank-other-tokenizer/ the same knowledge cut with tokenizer-other/ and encoded by a run of the
                          same model shape trained on data of that tokenizer (run-other-tokenizer/)
    """
    from memory3.config import Recipe
    from memory3.data import prepare_data, train_tokenizer
    from memory3.data.synthetic import make_world, write_world
    from memory3.memory.build import build_bank
    from memory3.train.trainer import train

    root.mkdir(parents=True, exist_ok=True)
    files = write_world(make_world(seed=0, n_entities=60), root / "corpus")
    tok = train_tokenizer([files["corpus"]], root / "tokenizer", 512, progress=False)
    train_tokenizer([files["knowledge"]], root / "tokenizer-other", 400, progress=False)
    train_tokenizer([files["corpus"]], root / "tokenizer-700", 700, progress=False)
    prepare_data([files["corpus"]], tok.path, root / "shards", valid_fraction=0.05,
                 progress=False)
    prepare_data([files["corpus"]], root / "tokenizer-other", root / "shards-other-tokenizer",
                 valid_fraction=0.05, progress=False)
    base = [f"data.path={root / 'shards'}", "train.eval_every=100", "train.eval_batches=1"]
    train(Recipe.from_name("tiny-warmup").override(
        [*base, "train.max_steps=2", "train.save_every=2"]), root / "run", progress=False)
    train(Recipe.from_name("tiny-warmup").override(
        [*base, "train.max_steps=1", "train.save_every=1", "model.d_mlp=96"]),
        root / "run-other-shape", progress=False)
    train(Recipe.from_name("tiny-warmup").override(
        [*base[1:], f"data.path={root / 'shards-other-tokenizer'}", "train.max_steps=1",
         "train.save_every=1", "model.vocab_size=512"]), root / "run-other-tokenizer",
        progress=False)
    build_bank(root / "run", [files["knowledge"]], root / "bank", progress=False)
    build_bank(root / "run-other-tokenizer", [files["knowledge"]], root / "bank-other-tokenizer",
               progress=False)
    return root


# -- running a case ---------------------------------------------------------------------------
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def digest(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a folder (a writer's lock file is no content)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files if p.name != "write.lock"}


@dataclass
class Result:
    case: Case
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    changed: list[str] = field(default_factory=list)  # untouched paths that changed

    @property
    def command(self) -> str:
        import shlex
        return "memory3 " + " ".join(shlex.quote(a) if len(a) < 60 else shlex.quote(a[:40] + "...")
                                     for a in self.argv)

    @property
    def message(self) -> str:
        """The line the case looks for (else the error line, else the last line printed)."""
        text = self.stdout if self.case.exit == 0 else self.stderr
        lines = [line for line in text.splitlines() if line.strip()]
        for line in lines:
            if re.search(self.case.message, line):
                return line
        errors = [line for line in lines if "error:" in line]
        return (errors or lines or [""])[-1]


def run_case(case: Case, root: Path, timeout: float = 300) -> Result:
    argv = case.prepare(root)
    before = {p: digest(root / p) for p in case.untouched}
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "memory3", *argv], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    changed = [p for p in case.untouched if digest(root / p) != before[p]]
    return Result(case, argv, proc.returncode, proc.stdout, proc.stderr, seconds, changed)


# -- inputs -----------------------------------------------------------------------------------
def _write(root: Path, name: str, data: str | bytes) -> str:
    path = root / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return name


def _mkdir(root: Path, name: str) -> str:
    (root / name).mkdir(exist_ok=True)
    return name


def _copy(root: Path, source: str, name: str) -> str:
    if not (root / name).exists():
        (shutil.copytree if (root / source).is_dir() else shutil.copy)(root / source, root / name)
    return name


def _corpus_text(root: Path, chars: int) -> str:
    """`chars` characters of the world's text on one line (paragraph breaks become spaces)."""
    text = " ".join((root / "corpus" / "corpus.txt").read_text().split())
    return (text * (chars // len(text) + 1))[:chars]


def _ten_mb_line(root: Path) -> str:
    if not (root / "line-10mb.txt").exists():
        _write(root, "line-10mb.txt", _corpus_text(root, 10_000_000) + "\n")
    return "line-10mb.txt"


def _long_knowledge(root: Path) -> str:
    """Three records, each ~1,000 characters (~450 tokens): every one longer than a reference
    (127 tokens and the reference-BOS)."""
    text = _corpus_text(root, 3000)
    records = [{"text": text[i * 1000:(i + 1) * 1000]} for i in range(3)]
    return _write(root, "knowledge-long.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def _check_long_knowledge(root: Path, proc: subprocess.CompletedProcess) -> None:
    from memory3.data import Tokenizer
    from memory3.memory.bank import MemoryBank

    tok = Tokenizer(root / "tokenizer")
    lengths = [len(tok.encode(json.loads(line)["text"]))
               for line in (root / "knowledge-long.jsonl").read_text().splitlines()]
    bank = MemoryBank.open(root / "bank-long")
    try:
        records = bank.references(list(range(bank.stats()["rows"])))
        assert all(1 <= len(r.tokens) <= REFERENCE_LEN - 1 for r in records)
        by_doc: dict[str, int] = {}
        for r in records:  # every record is kept whole, cut into windows that cover it
            by_doc[r.doc_id] = by_doc.get(r.doc_id, 0) + len(r.tokens)
        assert sorted(by_doc.values()) == sorted(lengths), (by_doc, lengths)
        assert bank.manifest["builds"][0]["read_stats"]["documents"] == 3
    finally:
        bank.close()


def _check_ten_mb_tokenizer(root: Path, proc: subprocess.CompletedProcess) -> None:
    from memory3.data import Tokenizer
    assert Tokenizer(root / "tokenizer-10mb").vocab_size == 512


def _check_ten_mb_shards(root: Path, proc: subprocess.CompletedProcess) -> None:
    manifest = json.loads((root / "shards-10mb" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["splits"]["train"]["documents"] == 1
    assert manifest["splits"]["train"]["tokens"] > 1_000_000


CONTINUAL = ["train", "--recipe", "tiny-continual", "--no-progress"]

CASES: list[Case] = [
    # -- recipes -----------------------------------------------------------------------------
    Case("unknown-recipe-field", "unknown recipe field (`max_stepz` in a recipe file)",
         lambda r: ["train", "--recipe", _write(r, "typo.toml", "[train]\nmax_stepz = 5\n"),
                    "--out", "run-typo", "data.path=shards"],
         2, r"recipe typo\.toml: unknown field\(s\) in train: \['max_stepz'\]; known: "),
    Case("unknown-override-field", "unknown recipe field (an override)",
         lambda r: ["train", "--recipe", "tiny-warmup", "--out", "run-typo", "data.path=shards",
                    "train.max_stepz=5"],
         2, r"override 'train\.max_stepz=5': unknown field 'train\.max_stepz'", slow=True),
    Case("wrong-type-recipe", "wrong type (`max_steps = \"ten\"` in a recipe file)",
         lambda r: ["train", "--recipe", _write(r, "ten.toml", '[train]\nmax_steps = "ten"\n'),
                    "--out", "run-ten", "data.path=shards"],
         2, r"recipe ten\.toml: train\.max_steps must be a number, got 'ten'"),
    Case("wrong-type-flag", "wrong type (a word for a size flag)",
         lambda r: ["eval", "--checkpoint", "run", "--data", "corpus/heldout.txt",
                    "--max-sequences", "ten"],
         2, r"argument --max-sequences: expected a positive integer, got 'ten'", slow=True),
    Case("negative-model-size", "negative size (model.n_layers=-2)",
         lambda r: ["train", "--recipe", "tiny-warmup", "--out", "run-neg", "data.path=shards",
                    "model.n_layers=-2"],
         2, r"model\.n_layers must be positive, got -2"),
    Case("negative-seq-len", "negative size (data.seq_len=-1)",
         lambda r: ["train", "--recipe", "tiny-warmup", "--out", "run-neg-seq", "--no-progress",
                    "data.path=shards", "data.seq_len=-1"],
         2, r"data\.seq_len must be positive, got -1", slow=True),
    Case("negative-flag", "negative size (build-bank --batch-size -3)",
         lambda r: ["build-bank", "--checkpoint", "run", "--knowledge", "corpus/knowledge.jsonl",
                    "--out", "bank-neg", "--batch-size", "-3"],
         2, r"argument --batch-size: expected a positive integer, got -3"),
    Case("negative-eval-seq-len", "negative size (eval --seq-len -4)",
         lambda r: ["eval", "--checkpoint", "run", "--data", "corpus/heldout.txt",
                    "--seq-len", "-4"],
         2, r"argument --seq-len: expected a positive integer, got -4", slow=True),
    # -- tokenizers, banks and checkpoints that do not belong together --------------------------
    Case("tokenizer-not-checkpoints", "a tokenizer that does not match the checkpoint",
         lambda r: ["eval", "--checkpoint", "run", "--data", "corpus/heldout.txt",
                    "--modes", "none", "--tokenizer", "tokenizer-other"],
         2, r"tokenizer tokenizer-other/tokenizer\.model \(sha256 \w+\.\.\.\) is not the one "
            r"checkpoint run was trained with \(sha256 \w+\.\.\., recorded in "
            r".*shards/manifest\.json\)"),
    Case("tokenizer-too-large", "a tokenizer larger than the checkpoint's vocabulary",
         lambda r: ["generate", "--checkpoint", "run", "--prompt", "The river",
                    "--tokenizer", "tokenizer-700"],
         2, r"tokenizer tokenizer-700/tokenizer\.model has 700 tokens, more than the "
            r"model\.vocab_size 512 of checkpoint run"),
    Case("bank-other-tokenizer", "a bank built by another tokenizer (eval)",
         lambda r: ["eval", "--checkpoint", "run", "--data", "corpus/heldout.txt",
                    "--bank", "bank-other-tokenizer", "--modes", "none,memory"],
         2, r"bank-other-tokenizer/manifest\.json was built with another tokenizer \(sha256 "
            r"\w+\.\.\.\) than .*tokenizer/tokenizer\.model"),
    Case("bank-other-tokenizer-continual", "a bank built by another tokenizer (continual "
         "training, which writes memories back)",
         lambda r: [*CONTINUAL, "--out", "run-continual-tok", "data.path=shards",
                    "continual.bank=bank-other-tokenizer", "train.init_from=run"],
         2, r"bank-other-tokenizer/manifest\.json was built with another tokenizer .* build one "
            r"with the tokenizer of data\.path /\S*/shards",  # train records absolute paths
         untouched=("bank-other-tokenizer",)),
    Case("bank-other-embedder", "a bank built by another embedder (extended with --embedder)",
         lambda r: ["build-bank", "--checkpoint", "run", "--knowledge", "corpus/knowledge.jsonl",
                    "--out", "bank", "--embedder", "hashing:256", "--no-progress"],
         2, r"bank/manifest\.json: --embedder hashing:256 is not the embedder this bank was "
            r"built with .*'dim': 512",
         untouched=("bank",)),
    Case("checkpoint-other-shape", "a checkpoint of another model shape for continual training",
         lambda r: [*CONTINUAL, "--out", "run-continual-shape", "data.path=shards",
                    "continual.bank=bank", "train.init_from=run-other-shape"],
         2, r"train\.init_from=/\S*/run-other-shape holds a 'tiny' model whose config differs from "
            r"this recipe's model section in d_mlp 96 there, 128 here",
         untouched=("run-other-shape",)),
    # -- text ---------------------------------------------------------------------------------
    Case("not-utf8", "text that is not UTF-8 (Latin-1)",
         lambda r: ["prepare-data", _write(r, "latin1.txt", "caf\xe9 cr\xe8me\n\nd\xe9j\xe0 vu\n"
                                           .encode("latin-1")),
                    "--tokenizer", "tokenizer", "--out", "shards-latin1"],
         2, r"no documents found in latin1\.txt \(read 0 documents from 1 files; skipped 2 "
            r"undecodable lines, not UTF-8 \(latin1\.txt: 2\)\)"),
    Case("ten-mb-line-tokenizer", "a 10 MB single line (train-tokenizer: like every line, it is "
         "cut to 4,096 characters for training)",
         lambda r: ["train-tokenizer", _ten_mb_line(r), "--out", "tokenizer-10mb",
                    "--vocab-size", "512"],
         0, r"tokenizer with 512 tokens written to tokenizer-10mb/tokenizer\.model",
         check=_check_ten_mb_tokenizer),
    Case("ten-mb-line-shards", "a 10 MB single line (prepare-data: one document, tokenized "
         "whole)",
         lambda r: ["prepare-data", _ten_mb_line(r), "--tokenizer", "tokenizer", "--out",
                    "shards-10mb", "--valid-fraction", "0"],
         0, r"prepared shards-10mb: train [\d,]+ tokens in 1 shards \(1 documents\)",
         check=_check_ten_mb_shards, slow=True),
    Case("empty-file", "an empty file (train-tokenizer into an existing tokenizer folder)",
         lambda r: ["train-tokenizer", _write(r, "empty.txt", ""), "--out",
                    _copy(r, "tokenizer", "tokenizer-kept"), "--vocab-size", "512"],
         2, r"no documents found in empty\.txt \(read 0 documents from 1 files\)",
         untouched=("tokenizer-kept",)),
    Case("empty-knowledge", "an empty file (build-bank into an existing bank)",
         lambda r: ["build-bank", "--checkpoint", "run", "--knowledge",
                    _write(r, "empty.jsonl", ""), "--out", "bank", "--no-progress"],
         2, r"no documents found in empty\.jsonl \(read 0 documents from 1 files\)",
         untouched=("bank",), slow=True),
    Case("references-over-length", "a knowledge base whose references all exceed the reference "
         "length (3 records of ~450 tokens; reference_len 128)",
         lambda r: ["build-bank", "--checkpoint", "run", "--knowledge", _long_knowledge(r),
                    "--out", "bank-long", "--no-progress"],
         0, r"built bank-long: \d+ references", check=_check_long_knowledge),
    Case("held-out-under-a-chunk", "a held-out file shorter than one chunk (eval --json over "
         "earlier results)",
         lambda r: ["eval", "--checkpoint", "run", "--data",
                    _write(r, "short.txt", "Gobam is a port.\n"), "--modes", "none", "--json",
                    _write(r, "results.json", '{"none": {"perplexity": 1.0}}\n')],
         2, r"short\.txt: \d+ tokens \(BOS and EOS included\), fewer than one sequence of 129 "
            r"\(seq_len 128 \+ 1 target\): give more held-out text or a smaller --seq-len",
         untouched=("results.json",)),
    Case("prompt-over-context", "a prompt longer than the model's context (generate)",
         lambda r: ["generate", "--checkpoint", "run", "--prompt",
                    (r / "corpus" / "corpus.txt").read_text()[:3000]],
         2, r"the prompt is \d+ tokens \(with BOS\), which leaves no room to generate under the "
            r"model's max_seq_len 256: shorten it", slow=True),
    Case("modes-without-bank", "eval modes that read memory, without a bank",
         lambda r: ["eval", "--checkpoint", "run", "--data", "corpus/heldout.txt", "--modes",
                    "none,memory"],
         2, r"--modes memory read references: pass --bank", slow=True),
    # -- paths --------------------------------------------------------------------------------
    Case("missing-checkpoint", "a non-existent path (--checkpoint)",
         lambda r: ["eval", "--checkpoint", "no-such-run", "--data", "corpus/heldout.txt",
                    "--modes", "none"],
         2, r"no checkpoint found at no-such-run \(expected a run directory"),
    Case("missing-input", "a non-existent path (an input file)",
         lambda r: ["prepare-data", "no-such-file.txt", "--tokenizer", "tokenizer", "--out",
                    "shards-missing"],
         2, r"input path no-such-file\.txt does not exist"),
    Case("missing-recipe", "a non-existent path (--recipe)",
         lambda r: ["train", "--recipe", "no-such-recipe.toml", "--out", "run-missing"],
         2, r"cannot read recipe no-such-recipe\.toml: .*No such file or directory"),
    Case("missing-bank", "a non-existent path (--bank)",
         lambda r: ["generate", "--checkpoint", "run", "--prompt", "The river", "--bank",
                    "no-such-bank"],
         2, r"no-such-bank/manifest\.json does not exist: no-such-bank holds no memory bank",
         slow=True),
    Case("folder-as-json", "a folder where a file is expected (eval --json)",
         lambda r: ["eval", "--checkpoint", "run", "--data", "corpus/heldout.txt", "--modes",
                    "none", "--json", "corpus"],
         2, r"argument --json: corpus is a folder; expected the path of a file to write",
         untouched=("corpus",)),
    Case("folder-as-recipe", "a folder where a file is expected (--recipe, named .toml)",
         lambda r: ["train", "--recipe", _mkdir(r, "folder.toml"), "--out", "run-folder"],
         2, r"folder\.toml is a folder; expected a recipe file"),
    Case("folder-as-recipe-name", "a folder where a file is expected (--recipe, a folder name)",
         lambda r: ["train", "--recipe", "shards", "--out", "run-folder"],
         2, r"shards is a folder; expected a recipe file", slow=True),
    Case("folder-as-tokenizer", "a folder where a file is expected (--tokenizer, no "
         "tokenizer.model in it)",
         lambda r: ["prepare-data", "corpus/corpus.txt", "--tokenizer", "corpus", "--out",
                    "shards-folder"],
         2, r"tokenizer model corpus/tokenizer\.model does not exist"),
    Case("file-as-out", "a file where a folder is expected (prepare-data --out)",
         lambda r: ["prepare-data", "corpus/corpus.txt", "--tokenizer", "tokenizer", "--out",
                    "corpus/heldout.txt"],
         2, r"corpus/heldout\.txt is a file; expected a folder \(new or existing\) to write into",
         untouched=("corpus/heldout.txt",)),
    Case("file-as-bank", "a file where a folder is expected (build-bank --out)",
         lambda r: ["build-bank", "--checkpoint", "run", "--knowledge", "corpus/knowledge.jsonl",
                    "--out", "corpus/knowledge.jsonl"],
         2, r"--out corpus/knowledge\.jsonl is a file; expected a bank folder",
         untouched=("corpus/knowledge.jsonl",)),
]
