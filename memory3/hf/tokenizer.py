"""Our sentencepiece tokenizer as a Hugging Face fast tokenizer (`tokenizer.json` and its config),
so that `AutoTokenizer.from_pretrained(DIR)` encodes exactly as `memory3.data.Tokenizer` does.

How each sentencepiece behaviour is reproduced:
- pieces and ids: the BPE vocabulary is the piece list itself, so every id is ours (`<ref>` = 4).
- merges: sentencepiece BPE repeatedly joins the adjacent pair whose joined piece scores highest;
  HF BPE joins the pair of lowest merge rank. Listing, for every piece, each split of it into two
  pieces, ranked by the piece's score (then id), gives the same order.
- whitespace: spaces become "▁" (escape_whitespaces); a leading "▁" only when the model adds a
  dummy prefix (ours does not; e.g. Llama 2's does). No other normalisation: models with a
  character map (nmt_nfkc) or that fold whitespace runs are refused rather than approximated.
- characters outside the vocabulary: byte fallback to the <0xXX> pieces, as sentencepiece.
- special pieces (control and unknown: <pad> <unk> <s> </s> <ref>) are special tokens, but
  `split_special_tokens` is on: the text "<ref>" encodes as characters, as in sentencepiece, where
  no text ever encodes to a control id. Get the id itself with `convert_tokens_to_ids("<ref>")`.
- `tokenizer(text)` puts <s> first, as our shards and `memory3 generate` do (every document is
  [bos] + tokens + [eos]); `add_special_tokens=False` gives exactly `Tokenizer.encode(text)`.
"""
from __future__ import annotations

import json

from memory3.hf import HFError
from memory3.hf.sentencepiece_model import (BPE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED,
                                            SentencePieceModel)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class TokenizerConversionError(HFError):
    pass


def _merges(model: SentencePieceModel) -> list[tuple[str, str]]:
    ids = {p.piece: i for i, p in enumerate(model.pieces) if p.type == NORMAL}
    ranked = sorted(((-p.score, i, p.piece) for i, p in enumerate(model.pieces)
                     if p.type == NORMAL and len(p.piece) > 1))
    merges = []
    for _, _, piece in ranked:
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        merges += sorted(((a, b) for a, b in splits if a in ids and b in ids),
                         key=lambda ab: (ids[ab[0]], ids[ab[1]]))
    return merges


def check_convertible(model: SentencePieceModel, where: str) -> None:
    norm = model.normalizer()
    problems = []
    if model.model_type != BPE:
        problems.append("it is not a BPE model (model_type "
                        f"{model.model_type}; Hugging Face Unigram conversion is not done here)")
    if norm["precompiled"] or norm["name"] not in ("identity", ""):
        problems.append(f"it normalises text ({norm['name']!r})")
    if norm["remove_extra_whitespaces"]:
        problems.append("it folds whitespace runs (remove_extra_whitespaces)")
    if not norm["escape_whitespaces"]:
        problems.append("it does not escape whitespace as ▁")
    if any(p.type == USER_DEFINED for p in model.pieces):
        problems.append("it has user-defined pieces")
    if problems:
        raise TokenizerConversionError(f"{where}: cannot be written as an exactly equal Hugging "
                                       f"Face tokenizer: {'; '.join(problems)}")


def hf_tokenizer_files(model_bytes: bytes, *, model_max_length: int,
                       where: str = "tokenizer.model") -> dict[str, str]:
    """{file name: text} of tokenizer.json, tokenizer_config.json and special_tokens_map.json for
    the sentencepiece model `model_bytes` (our special ids: pad 0, unk 1, bos 2, eos 3, <ref> 4)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE as BPEModel

    from memory3.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, REF_BOS_ID, UNK_ID

    model = SentencePieceModel.parse(model_bytes)
    check_convertible(model, where)
    pieces = [p.piece for p in model.pieces]
    unk, bos, eos, pad, ref = (pieces[i] for i in (UNK_ID, BOS_ID, EOS_ID, PAD_ID, REF_BOS_ID))
    vocab = {piece: i for i, piece in enumerate(pieces)}
    tok = Tokenizer(BPEModel(vocab=vocab, merges=_merges(model), unk_token=unk, fuse_unk=True,
                             byte_fallback=True))
    dummy_prefix = bool(model.normalizer()["add_dummy_prefix"])
    steps = [normalizers.Prepend("▁")] if dummy_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None  # sentencepiece BPE encodes the whole text, not words
    undo = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(undo + ([decoders.Strip(" ", 1, 0)] if dummy_prefix else []))
    specials = [p.piece for p in model.pieces if p.type in (CONTROL, UNKNOWN)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, BOS_ID)])
    special_map = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad,
                   "additional_special_tokens": [ref]}
    config = {
        # The generic fast class loads tokenizer.json as it is; LlamaTokenizer would rebuild the
        # pre-tokenizer with its own prefix-space rule.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": True, "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    return {"tokenizer.json": tok.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(config, indent=1, ensure_ascii=False),
            "special_tokens_map.json": json.dumps(special_map, indent=1, ensure_ascii=False)}
