"""A Hugging Face Llama checkpoint brought into memory3 (`train.init_from=hf:DIR`,
`memory3 import-hf DIR --out OUT`), so explicit memory can be added to a model one already has.

What is read from DIR: config.json (a `llama` model), the weights as safetensors (model.safetensors
or a sharded model.safetensors.index.json; pickled .bin files are refused, since loading them runs
code from the file), and a sentencepiece tokenizer.model.

Why a sentencepiece tokenizer.model is required: memory3's data pipeline (prepare-data, banks,
eval) tokenizes with sentencepiece and relies on fixed special ids (pad 0, unk 1, bos 2, eos 3,
<ref> 4; memory3/data/tokenizer.py). Llama checkpoints whose tokenizer exists only as a
tokenizer.json (Llama 3 and others with byte-level BPE) are refused with a message saying so.

The vocabulary is brought into our layout, not the code into theirs: the special pieces move to
ids 0-4 (`<pad>` and `<ref>` are added as control pieces when missing) and every other piece keeps
its order after them. The embedding and output rows move with their pieces; the rows of added
pieces start at the mean of the existing rows (an average token: neither an outlier in the
residual stream nor a logit that dominates; <ref> and <pad> are never predicted, so training
only lowers their output row). Text is cut exactly as before (sentencepiece finds pieces by
score, not id), so the model sees its usual tokens.

How the data pipeline gets that tokenizer: `memory3 import-hf DIR --out OUT` writes
OUT/tokenizer.model (our layout), to give to `memory3 prepare-data --tokenizer OUT`. The
conversion is deterministic, so `train.init_from=hf:DIR` builds the same tokenizer in memory and
checks that the training data was tokenized with it (same sha256).

What we cannot express is refused by name: biases, rope scaling, an activation other than SiLU.
The model's shape comes from config.json; how it reads memory (memory layers, memory_top_k,
chunk_len, reference_len, memories per chunk) and max_seq_len come from the recipe.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memory3.config import ConfigError, ModelConfig, Recipe
from memory3.hf import HFError
from memory3.hf.sentencepiece_model import CONTROL, ModelFileError, Piece, SentencePieceModel

HF_PREFIX = "hf:"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
WEIGHTS_FILE, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"


class LlamaImportError(HFError):
    pass


def hf_dir_of(init_from: str) -> Path | None:
    """The folder of an `hf:DIR` init_from, or None for our own checkpoints."""
    return Path(init_from[len(HF_PREFIX):]) if init_from.startswith(HF_PREFIX) else None


# -- config -------------------------------------------------------------------------------------
def llama_shape(hf_dir: Path) -> dict[str, Any]:
    """Our ModelConfig fields that shape the weights, from DIR/config.json (vocab_size before any
    piece is added)."""
    path = hf_dir / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LlamaImportError(f"cannot read {path} ({e}): hf:DIR must be a Hugging Face model "
                               f"folder") from e
    if raw.get("model_type") != "llama":
        raise LlamaImportError(f"{path}: model_type is {raw.get('model_type')!r}; only Llama "
                               f"checkpoints (model_type 'llama') can be imported")
    try:
        from transformers import LlamaConfig
    except ImportError as e:
        raise LlamaImportError("importing a Hugging Face checkpoint needs the transformers package "
                               "(pip install -e '.[dev]')") from e
    c = LlamaConfig.from_pretrained(hf_dir)  # fills the defaults config.json may leave out
    problems = []
    if c.hidden_act != "silu":
        problems.append(f"hidden_act {c.hidden_act!r} (ours is silu)")
    for name in ("attention_bias", "mlp_bias"):
        if getattr(c, name, False):
            problems.append(f"{name} true (ours has no biases)")
    # transformers 5 keeps rope settings in rope_parameters, 4.x in rope_theta + rope_scaling.
    rope = {**(getattr(c, "rope_parameters", None) or {}),
            **(getattr(c, "rope_scaling", None) or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"rope scaling {rope_type!r} (ours is plain rotary)")
    if problems:
        raise LlamaImportError(f"{path}: cannot be expressed in memory3: {'; '.join(problems)}")
    n_heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    return dict(vocab_size=c.vocab_size, n_layers=c.num_hidden_layers, d_model=c.hidden_size,
                n_heads=n_heads, n_kv_heads=c.num_key_value_heads or n_heads, head_dim=head_dim,
                d_mlp=c.intermediate_size,
                rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
                norm_eps=float(c.rms_norm_eps), tie_embeddings=bool(c.tie_word_embeddings),
                token_shift=False)


# -- vocabulary ---------------------------------------------------------------------------------
@dataclass
class Vocabulary:
    """A tokenizer brought into our layout: the new model bytes and, for each new piece id, the
    old id it came from (None for an added piece)."""
    model_bytes: bytes
    old_ids: list[int | None]
    n_old_pieces: int
    notes: list[str]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model_bytes).hexdigest()

    @property
    def added(self) -> int:
        return sum(i is None for i in self.old_ids)


def our_vocabulary(model_bytes: bytes, where: str) -> Vocabulary:
    """Move a sentencepiece model's special pieces to our ids, adding <pad> and <ref> if missing."""
    import sentencepiece as spm

    from memory3.data.tokenizer import REF_BOS_PIECE

    try:
        model = SentencePieceModel.parse(model_bytes)
        sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    except (ModelFileError, RuntimeError) as e:
        raise LlamaImportError(f"{where} is not a sentencepiece model ({e})") from e
    pieces = list(model.pieces)
    ids = {p.piece: i for i, p in enumerate(pieces)}
    notes: list[str] = []

    def find_or_add(found: int, name: str, what: str) -> int:
        if found >= 0:
            return found
        if name in ids:
            raise LlamaImportError(f"{where}: has no {what} token but a piece {name!r} that is not "
                               f"one; cannot add {name!r} as a control piece")
        pieces.append(Piece(name, 0.0, CONTROL))
        ids[name] = len(pieces) - 1
        notes.append(f"added {name!r} ({what}) as a control piece")
        return ids[name]

    unk, bos, eos = sp.unk_id(), sp.bos_id(), sp.eos_id()
    if min(unk, bos, eos) < 0:
        raise LlamaImportError(f"{where}: needs unk, bos and eos pieces (found ids {unk}, {bos}, "
                               f"{eos}; -1 = missing)")
    pad = find_or_add(sp.pad_id(), "<pad>", "padding")
    ref = ids.get(REF_BOS_PIECE, -1)
    if ref >= 0 and pieces[ref].type != CONTROL:
        raise LlamaImportError(f"{where}: {REF_BOS_PIECE!r} is an ordinary piece of this "
                               f"vocabulary; memory3 needs it as a control piece that no text "
                               f"encodes to")
    ref = find_or_add(ref, REF_BOS_PIECE, "reference-BOS")
    special = [pad, unk, bos, eos, ref]
    order = special + [i for i in range(len(pieces)) if i not in special]
    if order != list(range(len(pieces))):
        moved = [f"{pieces[old].piece!r} {old}->{new}" for new, old in enumerate(special)
                 if old != new and old < len(model.pieces)]
        if moved:
            notes.append("moved " + ", ".join(moved))
        new_model = dataclasses.replace(model, pieces=[pieces[i] for i in order])
        new_model.set_special_pieces(unk=pieces[unk].piece, bos=pieces[bos].piece,
                                     eos=pieces[eos].piece, pad=pieces[pad].piece)
        model_bytes = new_model.serialize()
    n_old = len(model.pieces)
    return Vocabulary(model_bytes, [i if i < n_old else None for i in order], n_old, notes)


def reorder_rows(weight: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
    """Embedding/output rows in the new piece order; added pieces at the mean row. Rows past the
    tokenizer's pieces (a vocabulary padded for speed) follow unchanged."""
    mean = weight.float().mean(dim=0).to(weight.dtype)
    rows = [weight[i] if i is not None else mean for i in vocab.old_ids]
    return torch.cat([torch.stack(rows), weight[vocab.n_old_pieces:]])


# -- weights ------------------------------------------------------------------------------------
def _read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = hf_dir / WEIGHTS_INDEX
    if (hf_dir / WEIGHTS_FILE).is_file():
        files = [hf_dir / WEIGHTS_FILE]
    elif index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        files = [hf_dir / f for f in sorted(shards)]
    else:
        pickled = sorted(p.name for p in hf_dir.glob("*.bin"))
        why = (f" (only {', '.join(pickled)}: pickled weights are not read, since loading them "
               f"runs code from the file; save the model as safetensors first)" if pickled else "")
        raise LlamaImportError(f"{hf_dir} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX}{why}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


# -- the whole import ---------------------------------------------------------------------------
@dataclass
class ImportedLlama:
    model: ModelConfig
    vocab: Vocabulary
    source: Path


def import_config(hf_dir: str | Path, base: ModelConfig) -> ImportedLlama:
    """Our ModelConfig for the Llama in hf_dir: its shape (vocab_size grown by the added pieces),
    with how memory is read and max_seq_len taken from `base`. Reads no weights."""
    hf_dir = Path(hf_dir)
    shape = llama_shape(hf_dir)
    tok_path = hf_dir / TOKENIZER_FILE
    if not tok_path.is_file():
        raise LlamaImportError(f"{hf_dir} has no sentencepiece {TOKENIZER_FILE}: memory3 tokenizes "
                               f"its data with sentencepiece, so only Llama checkpoints that ship "
                               f"one (Llama 2, TinyLlama, ...) can be imported; a tokenizer.json "
                               f"alone (byte-level BPE, e.g. Llama 3) is not supported")
    vocab = our_vocabulary(tok_path.read_bytes(), str(tok_path))
    if vocab.n_old_pieces > shape["vocab_size"]:
        raise LlamaImportError(f"{tok_path} has {vocab.n_old_pieces} pieces but "
                               f"{hf_dir / CONFIG_FILE} vocab_size is {shape['vocab_size']}: "
                               f"not this model's tokenizer")
    shape["vocab_size"] += vocab.added
    cfg = dataclasses.replace(base, name=f"hf-{hf_dir.resolve().name}", **shape)
    try:
        cfg.validate()
    except ConfigError as e:
        raise LlamaImportError(f"{hf_dir / CONFIG_FILE}: {e}") from e
    return ImportedLlama(cfg, vocab, hf_dir)


def import_weights(imported: ImportedLlama) -> dict[str, torch.Tensor]:
    """Our state dict (fp32) for `imported.model`, vocabulary rows in our order."""
    from memory3.model.hf import from_llama_state_dict

    cfg = imported.model
    hf_state = {k: v.float() for k, v in _read_safetensors(imported.source).items()}
    try:
        state = from_llama_state_dict(hf_state, cfg)
    except (KeyError, ValueError) as e:
        raise LlamaImportError(f"{imported.source}: the weights do not match its {CONFIG_FILE} "
                               f"as a Llama ({e})") from e
    state["embed.weight"] = reorder_rows(state["embed.weight"], imported.vocab)
    state["lm_head.weight"] = (state["embed.weight"] if cfg.tie_embeddings
                               else reorder_rows(state["lm_head.weight"], imported.vocab))
    return state


def recipe_for(recipe: Recipe) -> tuple[Recipe, ImportedLlama | None]:
    """The recipe with its model shape taken from an `hf:DIR` init_from (unchanged otherwise)."""
    hf_dir = hf_dir_of(recipe.train.init_from)
    if hf_dir is None:
        return recipe, None
    imported = import_config(hf_dir, recipe.model)
    return dataclasses.replace(recipe, model=imported.model).validate(), imported


def check_data_tokenizer(imported: ImportedLlama, data_path: str) -> None:
    """Refuse training data tokenized with anything but the imported model's tokenizer."""
    from memory3.data import load_manifest

    if not data_path:
        return  # the phase says that data.path is missing
    tokenizer = load_manifest(data_path)["tokenizer"]
    if tokenizer["sha256"] != imported.vocab.sha256:
        raise ConfigError(
            f"data.path {data_path} was tokenized with {tokenizer['path']} (sha256 "
            f"{tokenizer['sha256'][:12]}), not with the tokenizer of hf:{imported.source} in "
            f"memory3's layout (sha256 {imported.vocab.sha256[:12]}); write that one with "
            f"`memory3 import-hf {imported.source} --out OUT` and tokenize with "
            f"`memory3 prepare-data ... --tokenizer OUT`")


def import_hf(hf_dir: str | Path, out: str | Path, *, base: ModelConfig | None = None,
              force: bool = False) -> Path:
    """`memory3 import-hf`: the Llama in hf_dir as an exported folder (memory3/hf/export.py) in
    our vocabulary layout; its tokenizer.model is the one to tokenize training data with."""
    from memory3.hf.export import write_hf_folder

    imported = import_config(hf_dir, base or ModelConfig())
    recipe = Recipe(name=imported.model.name, model=imported.model)
    recipe.data.seq_len = min(recipe.data.seq_len, imported.model.max_seq_len)
    provenance = {"hugging_face": str(Path(hf_dir).resolve()), "vocabulary": imported.vocab.notes}
    return write_hf_folder(out, import_weights(imported), recipe.validate(),
                           imported.vocab.model_bytes, provenance, force=force)
