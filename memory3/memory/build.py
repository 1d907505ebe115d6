"""`memory3 build-bank`: a knowledge base -> references -> memories encoded by a checkpoint -> a bank.

Streaming: documents are read, tokenized and cut into references as they come (references.py);
references are encoded `batch_size` at a time and written `shard_memories` at a time, one segment
per shard, each committed to the manifest as soon as it is written.

Resume: references are numbered by their position in the input stream, which depends only on the
inputs, the tokenizer and reference_len (all recorded, and required to match on resume). A
build's entry in the manifest ("builds") records `next_reference`: every reference before it is
committed (or was a duplicate of a committed one). A re-run with the same arguments re-reads the
input, skips the references before `next_reference` without encoding them, and continues; files a
kill left half-written are not in the manifest and are deleted. Shards are cut at the same
references and encoded in the same batches as in an unbroken run, so the resumed bank is
byte-identical to it. The manifest holds no timestamps for the same reason.

Multi-rank (SPEC 1d): run the same command under `torchrun` or `deepspeed` (one process per GPU or
node). References are dealt to ranks by their key (so duplicates meet on one rank); rank r writes
segments named "r<r>-..." and in each round every rank writes at most one shard, whose manifest
entry is gathered to rank 0, which assigns row ids in rank order and commits. `next_reference` is
then one position per rank, and a resume needs the same world size. With one process this is the
same code with a world of one.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from memory3.data.shards import load_manifest as load_data_manifest
from memory3.data.text import (DataError, Glob, PathLike, ReadStats, globs, iter_documents,
                               list_files, require_documents)
from memory3.data.tokenizer import PAD_ID, REF_BOS_ID, Tokenizer
from memory3.memory.bank import MemoryBank, checkpoint_encoder
from memory3.memory.embedders import LexicalEmbedder, check_embedder, make_embedder
from memory3.memory.encoder import EncodedMemories, MemoryEncoder
from memory3.memory.references import Reference, iter_references, pack_references
from memory3.memory.store import MANIFEST_FILE, BankError, key_bytes

# Test-only: seconds to sleep after each shard commit, so a test can kill a build mid-way.
SLOW_SHARD_ENV = "MEMORY3_TEST_SLOW_SHARD_SECONDS"
CODEC_TRAIN_REFERENCES = 1024


def _world() -> tuple[int, int]:
    """(rank, world size); joins the process group when a launcher started several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _tokenizer_for(recipe, tokenizer: PathLike | None, checkpoint: PathLike) -> Tokenizer:
    if tokenizer is not None:
        return Tokenizer(tokenizer)
    from memory3.checkpoints import carried_tokenizer
    carried = carried_tokenizer(checkpoint)  # an exported folder holds its own
    if carried is not None:
        return carried
    if not recipe.data.path:
        raise BankError(f"the recipe of checkpoint {checkpoint} names no data.path to find its "
                        f"tokenizer in; pass --tokenizer")
    try:
        path = load_data_manifest(recipe.data.path)["tokenizer"]["path"]
    except DataError as e:
        raise BankError(f"cannot find the tokenizer of checkpoint {checkpoint} through its "
                        f"data.path ({e}); pass --tokenizer") from e
    return Tokenizer(path)


def encode_in_batches(encoder: MemoryEncoder, refs: Sequence[Reference], batch_size: int,
                      reference_len: int) -> EncodedMemories:
    """Memories of `refs`, encoded batch_size at a time (batches start at refs[0])."""
    device = encoder.model.embed.weight.device
    parts = []
    for i in range(0, len(refs), batch_size):
        tokens, lengths = pack_references(refs[i:i + batch_size], ref_bos_id=REF_BOS_ID,
                                          pad_id=PAD_ID, reference_len=reference_len)
        parts.append(encoder.encode(tokens.to(device), lengths.to(device)).to("cpu"))
    return EncodedMemories(torch.cat([p.kv for p in parts]),
                           torch.cat([p.positions for p in parts]))


def check_bank_tokenizer(bank: MemoryBank, tokenizer: Tokenizer, remedy: str) -> None:
    """Raise unless the bank's references were cut by `tokenizer` (banks made before the
    manifest recorded its tokenizer pass unchecked): another tokenizer's token ids are other
    text, so its memories and its overlap filter would be garbage to this model."""
    recorded = bank.manifest.get("tokenizer")
    if recorded and recorded["sha256"] != tokenizer.sha256:
        raise BankError(f"{bank.path / MANIFEST_FILE} was built with another tokenizer (sha256 "
                        f"{recorded['sha256'][:12]}...) than {tokenizer.path} (sha256 "
                        f"{tokenizer.sha256[:12]}...): its references are token ids of that "
                        f"tokenizer; {remedy}")


def _settings(files: list[Path], text_field: str, tokenizer: Tokenizer, reference_len: int,
              patterns: tuple[str, ...]) -> dict[str, Any]:
    settings = {"inputs": [{"path": str(f.resolve()), "bytes": f.stat().st_size} for f in files],
                "text_field": text_field, "tokenizer_sha256": tokenizer.sha256,
                "reference_len": reference_len}
    if patterns:  # recorded only when used, so builds made before globs existed still resume
        settings["glob"] = list(patterns)
    return settings


def _open_or_create(out: Path, model_cfg, embedder: str | None, codec: str | None,
                    index: str | None, tokenizer: Tokenizer, min_relative_score: float | None,
                    texts: Callable[[], Iterator[str]]) -> MemoryBank:
    """The bank at `out`, checked against this build's settings, or a new one. texts: the
    knowledge base's reference texts, which a lexical embedder is fitted on."""
    if (out / MANIFEST_FILE).exists():
        bank = MemoryBank.open(out)
        bank.check_model_config(model_cfg, "the checkpoint")
        if embedder is not None:
            try:
                check_embedder(make_embedder(embedder), bank.manifest["embedder"])
            except BankError as e:
                raise BankError(f"{out / MANIFEST_FILE}: --embedder {embedder} is not the "
                                f"embedder this bank was built with ({e}); an existing bank "
                                f"keeps its own: leave --embedder out or use another folder"
                                ) from e
        wanted = codec or "none"
        have = bank.manifest["storage"]["codec"]
        from memory3.memory.codec import expand_factory
        if expand_factory(wanted, bank.layout.head_dim) != have:
            raise BankError(f"{out / MANIFEST_FILE} stores memories with codec {have!r}, not "
                            f"{wanted!r}: use the bank's codec or another folder")
        if index is not None and index != bank.manifest["index_factory"]:
            raise BankError(f"{out / MANIFEST_FILE} chooses its index as "
                            f"{bank.manifest['index_factory'] or 'by size'}, not {index!r}: "
                            f"rebuild it with MemoryBank.rebuild_index(factory)")
        if min_relative_score is not None and min_relative_score != bank.min_relative_score:
            raise BankError(f"{out / MANIFEST_FILE} retrieves with min_relative_score "
                            f"{bank.min_relative_score}, not {min_relative_score}: leave it out "
                            f"or use another folder")
        check_bank_tokenizer(bank, tokenizer, "extend it with that tokenizer or use another "
                                              "folder")
        return bank
    wanted = make_embedder(embedder or "hashing:512")
    if isinstance(wanted, LexicalEmbedder):
        wanted = wanted.fit(texts())
    return MemoryBank.create(out, model_cfg, embedder=wanted, codec=codec, index=index,
                             tokenizer_sha256=tokenizer.sha256,
                             min_relative_score=min_relative_score or 0.0)


def _start_build(bank: MemoryBank, settings: dict[str, Any], encoder: dict[str, Any],
                 world: int) -> dict[str, Any]:
    """The manifest's entry for this build: the unfinished one with these settings, or new."""
    builds = bank.manifest["builds"]
    for build in builds:
        if build["settings"] == settings:
            if build["complete"]:
                return build
            if build["encoder"] != encoder["id"]:
                raise BankError(f"{bank.path / MANIFEST_FILE}: this build was started with the "
                                f"checkpoint {build['encoder']}; finish it with that checkpoint "
                                f"(or use another folder)")
            if len(build["next_reference"]) != world:
                raise BankError(f"{bank.path / MANIFEST_FILE}: this build was started with "
                                f"{len(build['next_reference'])} ranks; resume it with as many")
            return build
    unfinished = [b for b in builds if not b["complete"]]
    if unfinished:
        inputs = ", ".join(i["path"] for i in unfinished[0]["settings"]["inputs"])
        raise BankError(f"{bank.path / MANIFEST_FILE}: an unfinished build of {inputs} (or with "
                        f"another tokenizer, text field or reference length) is in this bank; "
                        f"finish it by running it again first")
    build = {"settings": settings, "encoder": encoder["id"], "next_reference": [0] * world,
             "references": 0, "duplicates": 0, "complete": False, "read_stats": None}
    builds.append(build)
    bank.store.encoder_index(encoder)
    bank.commit(save_index=False)
    return build


def _my_references(refs: Iterator[Reference], rank: int, world: int, start: int
                   ) -> Iterator[tuple[int, Reference]]:
    """(stream position, reference) for this rank's references from `start` on."""
    for position, ref in enumerate(refs):
        if position >= start and (world == 1 or int(ref.key[:8], 16) % world == rank):
            yield position, ref


def _next_shard(mine: Iterator[tuple[int, Reference]], bank: MemoryBank, added: set[bytes],
                size: int) -> tuple[list[Reference], int, int | None]:
    """Up to `size` new references (not in the bank, not added by this rank in this run), the
    number of duplicates passed over, and the stream position after the last one consumed
    (None when the stream had nothing left)."""
    shard: list[Reference] = []
    duplicates, after = 0, None
    keys = bank.store.keys
    for position, ref in mine:
        after = position + 1
        k = key_bytes(ref.key)
        if k in keys or k in added:
            duplicates += 1
            continue
        added.add(k)
        shard.append(ref)
        if len(shard) == size:
            break
    return shard, duplicates, after


def build_bank(checkpoint: PathLike, knowledge: Sequence[PathLike], out: PathLike, *,
               embedder: str | None = None, codec: str | None = None, index: str | None = None,
               min_relative_score: float | None = None, batch_size: int = 32,
               shard_memories: int = 1024, text_field: str = "text",
               tokenizer: PathLike | None = None, device: str | None = None,
               shard_dir: PathLike | None = None, glob: Glob = None,
               memory_layers: str | list[int] | None = None,
               memory_top_k: int | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Build (or resume, or extend) the memory bank `out` from the documents of `knowledge`.

    Returns the bank's stats plus this run's counts. See the module docstring for resume and
    multi-rank builds. shard_dir: where this run writes its segments (default BANK/shards).
    min_relative_score: recorded in a new bank (MemoryBank.create); an existing one keeps its own.
    glob: file-name patterns selecting the knowledge files, each text file one document
    (memory3.data.text).
    memory_layers: the layers whose memories are stored (default: the checkpoint's
    model.memory_layers). They shape no weight, so a continual recipe may read other layers than
    the warmup checkpoint that encodes its bank was trained with; its bank must store those.
    memory_top_k: tokens kept per memory layer and KV head (default: the checkpoint's); shapes
    no weight either, so a continual recipe may keep more or fewer than its warmup's.
    """
    from memory3.checkpoints import check_tokenizer, load_model

    if batch_size <= 0 or shard_memories <= 0:
        raise BankError(f"batch_size and shard_memories must be positive, got {batch_size} and "
                        f"{shard_memories}")
    out = Path(out)
    for folder, flag, what in ((out, "--out", "a bank folder (new or existing)"),
                               (shard_dir, "--shard-dir", "a folder for the bank's shards")):
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            raise BankError(f"{flag} {folder} is a file; expected {what} to write into")
    started = time.perf_counter()
    rank, world = _world()
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() \
            else "cpu"
    model, recipe, _ = load_model(checkpoint, device=device)
    chosen = {k: v for k, v in (("memory_layers", memory_layers), ("memory_top_k", memory_top_k))
              if v is not None}
    if chosen:
        model.cfg = dataclasses.replace(model.cfg, **chosen).validate()
    model_cfg = model.cfg
    encoder = MemoryEncoder(model)
    encoder_record = checkpoint_encoder(checkpoint)
    tok = _tokenizer_for(recipe, tokenizer, checkpoint)
    check_tokenizer(checkpoint, tok, model_cfg.vocab_size)
    patterns = globs(glob)
    files = list_files(knowledge, patterns)
    probe = ReadStats()
    next(iter_documents(files, text_field, probe, patterns), None)
    require_documents(probe, knowledge)  # an empty knowledge base fails before any work
    settings = _settings(files, text_field, tok, model_cfg.reference_len, patterns)
    reference_len = model_cfg.reference_len

    # Rank 0 makes or opens the bank (cleaning a killed run's files), registers the encoder and
    # trains the codec; the other ranks open it once that is committed.
    if rank == 0:
        texts = (lambda: (r.text for r in iter_references(
            files, tok, reference_len, text_field=text_field, glob=patterns)))
        bank = _open_or_create(out, model_cfg, embedder, codec, index, tok, min_relative_score,
                               texts)
        bank.shard_dir = Path(shard_dir).absolute() if shard_dir else None
        build = _start_build(bank, settings, encoder_record, world)
        if not build["complete"]:
            # Take the write lock (which deletes what a killed run left half-written) before the
            # barrier: at the first commit it would be too late, other ranks already writing
            # their next segments (tests/test_kill_anywhere.py).
            bank.store.lock()
        if not build["complete"] and not bank.codec.trained:
            sample_refs = [r for _, r in zip(range(CODEC_TRAIN_REFERENCES),
                                             iter_references(files, tok, reference_len,
                                                             text_field=text_field,
                                                             glob=patterns))]
            bank.train_codec(encode_in_batches(encoder, sample_refs, batch_size, reference_len))
    _barrier(world)
    if rank != 0:
        bank = MemoryBank.open(out, verify="size", shard_dir=shard_dir)
        build = next(b for b in bank.manifest["builds"] if b["settings"] == settings)
    if build["complete"]:
        if rank == 0:
            print(f"{out} already holds this build; nothing to do")
        return {**bank.stats(), "added": 0, "seconds": time.perf_counter() - started}

    encoder_id = encoder_record["id"]
    slow = float(os.environ.get(SLOW_SHARD_ENV, "0"))
    stats = ReadStats()
    start = build["next_reference"][rank]
    mine = _my_references(iter_references(files, tok, reference_len, text_field=text_field,
                                          stats=stats, glob=patterns), rank, world, start)
    writer = f"r{rank:03d}"
    segment_number = int(bank.store.next_segment_name(writer).rsplit("-", 1)[1])
    added: set[bytes] = set()
    added_now = 0
    bar = tqdm(desc=f"build-bank {out}", unit=" refs", initial=start, disable=not progress or
               rank != 0)
    while True:
        shard, duplicates, after = _next_shard(mine, bank, added, shard_memories)
        entry = None
        if shard:
            memories = encode_in_batches(encoder, shard, batch_size, reference_len)
            entry, _, _ = bank.write_references(shard, memories, encoder_id,
                                                name=f"{writer}-{segment_number:06d}")
            segment_number += 1
        report = {"entry": entry, "duplicates": duplicates, "after": after,
                  "references": len(shard)}
        reports = _gather(report, world)
        if rank == 0:
            for r, rep in enumerate(reports):
                if rep["entry"] is not None:
                    bank.store.append(rep["entry"])
                if rep["after"] is not None:
                    build["next_reference"][r] = rep["after"]
                build["references"] += rep["references"]
                build["duplicates"] += rep["duplicates"]
            if any(rep["after"] is not None for rep in reports):
                bank.commit(save_index=False)
        added_now += sum(rep["references"] for rep in reports)
        bar.update(sum(rep["references"] + rep["duplicates"] for rep in reports))
        if all(rep["after"] is None for rep in reports):
            break
        if slow:
            time.sleep(slow)
    bar.close()

    summary: dict[str, Any] = {}
    if rank == 0:
        # The input is read whole now (every rank reads all of it): its counts are complete.
        build["read_stats"] = stats.to_dict()
        build["complete"] = True
        bank.commit(save_index=True)  # builds or extends the index from the stored embeddings
        seconds = time.perf_counter() - started
        summary = {**bank.stats(), "added": added_now, "seconds": seconds}
        print(f"built {out}: {summary['rows']:,} references ({added_now:,} added now, "
              f"{build['duplicates']:,} duplicates skipped in all) in {seconds:.1f} s = "
              f"{added_now / max(seconds, 1e-9):,.1f} references/s; "
              f"{summary['kv_bytes_per_memory']:,} bytes per memory "
              f"({summary['record_bytes_per_memory']:,} with positions and record); "
              f"codec {summary['codec']}, index {summary['index']['factory']}")
        if stats.skipped_anything():
            print(stats.summary())
    _barrier(world)
    bank.close()
    return summary
