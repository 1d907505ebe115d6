"""SentencePiece BPE tokenizer with fixed special-token ids.

Ids 0-4 are the same for every tokenizer we train, so code elsewhere may rely on them:
pad=0, unk=1, bos=2, eos=3, ref_bos=4. The reference-BOS "<ref>" begins every memory reference; it
is a sentencepiece control symbol, so no input text (not even the string "<ref>") encodes to it.

Text is kept exactly: no normalization, no whitespace folding, no dummy prefix, and byte fallback
for characters outside the vocabulary. So `decode(encode(t)) == t` for every string, and a piece of
text encodes the same wherever it is cut from, which matters for references encoded on their own.
"""
from __future__ import annotations

import hashlib
import io
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from memory3.data.text import (DataError, Document, Glob, PathLike, ReadStats, globs,
                               iter_documents, list_files, require_documents)
from memory3.files import no_space_as, require_folder, write_atomic

MODEL_FILE = "tokenizer.model"
VOCAB_FILE = "tokenizer.vocab"
PAD_ID, UNK_ID, BOS_ID, EOS_ID, REF_BOS_ID = 0, 1, 2, 3, 4
REF_BOS_PIECE = "<ref>"
N_SPECIAL = 5
# Byte fallback needs one piece per byte value besides the special tokens; sentencepiece also
# wants a piece per common character, and reports how many when the vocabulary is too small.
MIN_VOCAB_SIZE = 256 + N_SPECIAL + 1
MAX_SENTENCE_BYTES = 16384
# Longer lines are cut for training only: 4 bytes per character at most keeps every piece within
# MAX_SENTENCE_BYTES, which sentencepiece would otherwise drop whole.
MAX_SENTENCE_CHARS = MAX_SENTENCE_BYTES // 4


def _sample_lines(documents: Iterable[Document], max_sentences: int, seed: int,
                  progress: bool) -> list[str]:
    """A uniform sample of `max_sentences` of the documents' non-empty lines (all of them when
    fewer; reservoir sampling, seeded). Drawn here, not by sentencepiece: its own sampling does not
    follow spm.set_random_generator_seed from one process to the next, so the same input gave a
    different tokenizer, hence different shards, on every run."""
    rng = random.Random(seed)
    kept: list[str] = []
    seen = 0
    with tqdm(desc="tokenizer input", unit=" lines", disable=not progress) as bar:
        for doc in documents:
            for line in doc.text.splitlines():
                if not line.strip():
                    continue
                seen += 1
                bar.update()
                if len(kept) < max_sentences:
                    kept.append(line[:MAX_SENTENCE_CHARS])
                elif (j := rng.randrange(seen)) < max_sentences:
                    kept[j] = line[:MAX_SENTENCE_CHARS]
    return kept


def train_tokenizer(inputs: Sequence[PathLike], out_dir: PathLike, vocab_size: int, *,
                    text_field: str = "text", max_sentences: int = 2_000_000, seed: int = 0,
                    glob: Glob = None, progress: bool = True) -> Tokenizer:
    """Train a BPE tokenizer on the documents of `inputs`; write out_dir/tokenizer.model (+ .vocab).

    The whole input is read once, line by line, keeping a uniform sample of `max_sentences` lines
    (seeded: the same inputs give the same tokenizer), so every file counts, not just the first.
    To train faster on a huge corpus, pass a subset of its files. glob: file-name patterns
    selecting files, each read whole as one document (memory3.data.text).
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocab_size {vocab_size} is too small: byte fallback needs 256 byte "
                        f"pieces + {N_SPECIAL} special tokens + a piece per common character "
                        f"(at least {MIN_VOCAB_SIZE}, typically 300 or more)")
    if max_sentences <= 100:
        raise DataError(f"max_sentences must be more than 100, got {max_sentences}")
    out_dir = Path(out_dir)
    require_folder(out_dir, DataError, f"to write {MODEL_FILE} into")  # now, not after training
    stats = ReadStats()
    patterns = globs(glob)
    documents = iter_documents(list_files(inputs, patterns), text_field, stats,  # raises early
                               patterns)
    lines = _sample_lines(documents, max_sentences, seed, progress)
    require_documents(stats, inputs)
    # The model comes back in memory: written via model_prefix it would record that (temporary)
    # path, and the same inputs would not give the same bytes, hence not the same sha256.
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model,
            model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
            character_coverage=0.9995, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, pad_id=PAD_ID, unk_id=UNK_ID,
            bos_id=BOS_ID, eos_id=EOS_ID, control_symbols=[REF_BOS_PIECE],
            max_sentence_length=MAX_SENTENCE_BYTES, num_threads=2, minloglevel=2)
    except RuntimeError as e:
        # sentencepiece prefixes the useful sentence with its source location
        reason = re.sub(r"^.*\]\s*", "", str(e))
        raise DataError(f"training a tokenizer with vocab_size {vocab_size} on "
                        f"{stats.documents} documents failed: {reason}") from e
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))
    out_dir.mkdir(parents=True, exist_ok=True)
    with no_space_as(DataError):
        write_atomic(out_dir / VOCAB_FILE, vocab.encode())
        write_atomic(out_dir / MODEL_FILE, model.getvalue())
    if progress or stats.skipped_anything():
        print(f"tokenizer: {stats.summary()}; wrote {out_dir / MODEL_FILE} "
              f"(vocab_size {vocab_size})")
    return Tokenizer(out_dir)


class Tokenizer:
    """A trained tokenizer; `Tokenizer(path)` takes tokenizer.model or the folder holding it."""

    pad_id, unk_id, bos_id, eos_id, ref_bos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID, REF_BOS_ID

    def __init__(self, path: PathLike, num_threads: int = 2):
        path = Path(path)
        self.path = path / MODEL_FILE if path.is_dir() else path
        if not self.path.is_file():
            raise DataError(f"tokenizer model {self.path} does not exist "
                            f"(train one with train_tokenizer)")
        model_bytes = self.path.read_bytes()
        # Shards record this digest so data is never read with a tokenizer it was not made with.
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self.num_threads = num_threads
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_bytes)
        except (RuntimeError, OSError) as e:
            raise DataError(f"{self.path} is not a sentencepiece model ({e})") from e
        self.vocab_size = self._sp.vocab_size()
        found = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id(),
                 self._sp.piece_to_id(REF_BOS_PIECE))
        expected = (PAD_ID, UNK_ID, BOS_ID, EOS_ID, REF_BOS_ID)
        if found != expected or not self._sp.is_control(REF_BOS_ID):
            raise DataError(f"{self.path}: special token ids (pad, unk, bos, eos, {REF_BOS_PIECE}) "
                            f"are {found}, expected {expected} with {REF_BOS_PIECE} a control "
                            f"symbol; train the tokenizer with memory3's train_tokenizer")

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=self.num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, leaving out the special tokens (ids below N_SPECIAL)."""
        return self._sp.decode([int(i) for i in ids if int(i) >= N_SPECIAL])

    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) int64: the UTF-8 bytes each token stands for in text (a piece's word
        boundary counts as its space; a byte-fallback piece is one byte; control tokens none).
        Bits per byte divide by these, so models with different tokenizers compare."""
        sp = self._sp
        return np.array([0 if sp.is_control(i) or sp.is_unknown(i) else
                         1 if sp.is_byte(i) else
                         len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
                         for i in range(self.vocab_size)], dtype=np.int64)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
