"""Kill at any point (issue 14 section 1): SIGKILL a real `memory3` job at seeded-random moments,
resume it with the same command until it completes, and compare with an uninterrupted run.
Used by tests/test_kill_anywhere.py (a bounded set, and a sweep behind the `slow` marker) and by
bench/kill_sweep.py (the table).

Design: the kill moments are drawn in time, not in the job's code, so they land wherever the job
happens to be: in a shard write, a manifest commit, a checkpoint save, an index write, or between
them. Every attempt's clock starts when it begins to work on its output: the first change of a
file in the output folder (one created, replaced, written or deleted; the write lock aside),
after imports and model loading, whose time varies more from launch to launch than many jobs
take to do their work. An uninterrupted reference run measures the work window W, from that
first change until the output is complete (`Job.done`), and each kill point is a moment u W into
an attempt's work, u uniform in [0, 1) from the seed. The first attempt starts a fresh run; after
each kill the same command runs again, resumes, and is killed at the next kill point into its
own work (early points land in the resume itself: the clean-up of what the last kill left). An
attempt that ends before its kill point (it had less than u W of work left) completes its run,
which is compared with the reference, and the point is tried again on a fresh run; a point that
even a fresh run outlives counts as tried but not landed. After the last point the run under way
goes on to its end and is compared too.

A kill stops the launched process first (SIGSTOP: it can neither finish nor start a child), then
SIGKILLs it and every descendant (torchrun puts its ranks in sessions of their own, so killing a
process group is not enough), and checks that none of them survives to write on. A kill landed
mid-job when the process was still running and its output not yet complete. After each kill,
`Job.torn` lists what it left half done (temp files, files no manifest lists, a checkpoint folder
without its memory3.json): evidence that kills land in the middle of writes, not only between
them.

The reference runs in the very folder the killed runs use, and is moved aside when it ends: an
output that records its own path (a continual run writes memories into its bank as made by
"<run folder>@<step>") is then comparable byte for byte. Every job runs with OMP_NUM_THREADS=1,
the reference included: the same kernels on the same thread count.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LOCK_FILE = "write.lock"  # names the last writer's pid and host: no content of the output
POLL_SECONDS = 0.005


# -- jobs ---------------------------------------------------------------------------------------

@dataclass
class Job:
    name: str
    argv: Callable[[Path], list[str]]             # the command writing into an output folder
    done: Callable[[Path], bool]                  # the output is complete
    torn: Callable[[Path], list[str]]             # what a kill left half done in the output
    compare: Callable[[Path, Path], list[str]]    # (reference, resumed) -> differences
    progress: Callable[[Path], str]               # how far the output is, in words
    timeout: float = 300.0                        # seconds per attempt


def job_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env


def memory3(*args: str) -> list[str]:
    return [sys.executable, "-m", "memory3", *args]


def torchrun(ranks: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(ranks), "-m", "memory3", *args]


def _complete(out: Path) -> bool:
    """The job's manifest.json says complete (prepare-data, memdec)."""
    return bool((manifest_of(out) or {}).get("complete"))


def _temp_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.tmp")) if out.is_dir() else []


def manifest_of(folder: Path) -> dict[str, Any] | None:
    """folder/manifest.json as it is now; None while it is missing."""
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _unlisted_segments(bank: Path) -> list[str]:
    """Segment and index files of a bank that its manifest does not list (a write not committed)."""
    manifest = manifest_of(bank) or {"segments": [], "index": None}
    listed = {f"{e['name']}.{kind}" for e in manifest["segments"] for kind in e["files"]}
    shards = bank / "shards"
    out = [f"shards/{p.name}" for p in shards.iterdir() if p.name not in listed] \
        if shards.is_dir() else []
    index = (manifest.get("index") or {}).get("file")
    return out + [p.name for p in bank.glob("index-*.faiss") if p.name != index]


# prepare-data --------------------------------------------------------------------------------

def prepare_data_job(inputs: Path, tokenizer: Path, *, shard_tokens: int = 16384) -> Job:
    """Shards of `inputs` (over 1 MiB of text, so that tokenizer batches close and commit shards
    before the input ends); shards and manifest must be byte-identical."""
    def argv(out: Path) -> list[str]:
        return memory3("prepare-data", str(inputs), "--tokenizer", str(tokenizer), "--out",
                       str(out), "--shard-tokens", str(shard_tokens), "--valid-fraction", "0.05",
                       "--workers", "1")

    def torn(out: Path) -> list[str]:
        manifest = manifest_of(out) or {"splits": {}}
        listed = {name for split in manifest["splits"].values() for s in split["shards"]
                  for name in (s["file"], s["file"][:-4] + ".crc")}
        unlisted = [p.name for p in out.glob("*") if p.name not in listed
                    and re.fullmatch(r"(train|valid)-\d{5}\.(bin|crc)", p.name)]
        return _temp_files(out) + sorted(unlisted)

    def progress(out: Path) -> str:
        manifest = manifest_of(out)
        if manifest is None:
            return "no manifest yet"
        return f"{sum(len(s['shards']) for s in manifest['splits'].values())} shards committed"

    return Job("prepare-data", argv, _complete, torn, same_files, progress)


# build-bank ----------------------------------------------------------------------------------

def build_bank_job(checkpoint: Path, knowledge: Path, *, ranks: int = 1) -> Job:
    """A bank of `knowledge` encoded by `checkpoint`, in segments of 6 memories (one commit
    each); 2 ranks run under torchrun. Compared through MemoryBank.open (`compare_banks`)."""
    def argv(out: Path) -> list[str]:
        args = ("build-bank", "--checkpoint", str(checkpoint), "--knowledge", str(knowledge),
                "--out", str(out), "--shard-memories", "6", "--batch-size", "3", "--no-progress")
        return memory3(*args) if ranks == 1 else torchrun(ranks, *args)

    def done(out: Path) -> bool:
        builds = (manifest_of(out) or {}).get("builds")
        return bool(builds and builds[-1]["complete"])

    def progress(out: Path) -> str:
        manifest = manifest_of(out)
        if manifest is None:
            return "no manifest yet"
        return f"{len(manifest['segments'])} segments committed"

    name = "build-bank" if ranks == 1 else f"build-bank {ranks} ranks"
    return Job(name, argv, done, lambda out: _temp_files(out) + sorted(_unlisted_segments(out)),
               compare_banks, progress)


# train ---------------------------------------------------------------------------------------

OWN_BANK = "memory-bank"  # a continual run's copy of its bank, inside the run folder


def model_overrides(run: Path) -> list[str]:
    """`model.field=value` overrides that give a `tiny` recipe the model of checkpoint `run`."""
    from memory3.checkpoints import model_config
    from memory3.config import ModelConfig

    preset = ModelConfig.from_name("tiny").to_dict()
    return [f"model.{k}={json.dumps(v)}" for k, v in model_config(run).to_dict().items()
            if k != "name" and v != preset.get(k)]


def train_job(data: Path, *, steps: int = 40, save_every: int = 2, eval_every: int = 20,
              continual: tuple[Path, Path] | None = None) -> Job:
    """tiny-warmup on `data`, a checkpoint every `save_every` steps (the last 2 kept). With
    continual=(warmup run, bank): tiny-continual from that run, reading its own copy of the bank
    (OWN_BANK), into which it writes the memories of cold references at every checkpoint."""
    recipe = "tiny-warmup" if continual is None else "tiny-continual"
    overrides = [f"data.path={data}", f"train.max_steps={steps}", f"train.save_every={save_every}",
                 f"train.eval_every={eval_every}", "train.keep_last=2", "train.eval_batches=2"]
    if continual is not None:
        from memory3.checkpoints import model_config
        run, _ = continual
        reads = model_config(run).memories_per_chunk  # 1 new reference per chunk, as many chunks
        overrides += [f"train.init_from={run}", *model_overrides(run),
                      "continual.new_per_chunk=1", f"continual.previous_chunks={reads}"]

    def argv(out: Path) -> list[str]:
        if continual is None:
            return memory3("train", "--recipe", recipe, "--out", str(out), "--no-progress",
                           *overrides)
        if not (out / OWN_BANK).exists():
            shutil.copytree(continual[1], out / OWN_BANK, ignore=shutil.ignore_patterns(LOCK_FILE))
        return memory3("train", "--recipe", recipe, "--out", str(out), "--no-progress",
                       *overrides, f"continual.bank={out / OWN_BANK}")

    def torn(out: Path) -> list[str]:
        saves = out / "checkpoints"
        unfinished = [f"checkpoints/{p.name}/" for p in saves.glob("step-*")
                      if not (p / "memory3.json").exists()] if saves.is_dir() else []
        bank = [f"{OWN_BANK}/{name}" for name in _unlisted_segments(out / OWN_BANK)] \
            if continual is not None else []
        return _temp_files(out) + sorted(unfinished) + bank

    def done(out: Path) -> bool:
        from memory3.checkpoints import latest_tag, tag_for
        return latest_tag(out / "checkpoints") == tag_for(steps)

    def progress(out: Path) -> str:
        from memory3.checkpoints import latest_tag
        logged = [r["step"] for r in _train_records(out) if r["kind"] == "train"] \
            if (out / "metrics.jsonl").exists() else []
        return f"step {max(logged, default=0)}, newest checkpoint {latest_tag(out / 'checkpoints')}"

    def compare(reference: Path, resumed: Path) -> list[str]:
        out = compare_training(reference, resumed)
        if continual is not None:
            out += [f"{OWN_BANK}: {d}" for d in compare_banks(reference / OWN_BANK,
                                                               resumed / OWN_BANK)]
        return out

    name = "train warmup" if continual is None else "train continual"
    return Job(name, argv, done, torn, compare, progress)


# memdec --------------------------------------------------------------------------------------

def _memdec_progress(out: Path) -> str:
    manifest = manifest_of(out)
    if manifest is None:
        return "no manifest yet"
    return f"{manifest['done_positions']:,} of {manifest['positions']:,} positions"


def datastore_job(base: Path, data: Path, *, positions: int = 3 * 65536) -> Job:
    """`memdec build-datastore` of the first `positions` positions of `data`: the command
    commits every 65,536 positions, so 3 commits, then the index and the checksums."""
    def argv(out: Path) -> list[str]:
        return memory3("memdec", "build-datastore", "--base", str(base), "--data", str(data),
                       "--out", str(out), "--max-tokens", str(positions), "--window", "128",
                       "--batch-size", "8", "--index", "flat", "--no-progress")

    return Job("memdec build-datastore", argv, _complete, _temp_files, same_files,
               _memdec_progress)


def targets_job(datastore: Path) -> Job:
    """`memdec build-targets` over `datastore`, a commit per 256 queries."""
    def argv(out: Path) -> list[str]:
        return memory3("memdec", "build-targets", "--datastore", str(datastore), "--out",
                       str(out), "--k", "16", "--top", "8", "--temperature", "0.5",
                       "--batch-size", "256", "--no-progress")

    return Job("memdec build-targets", argv, _complete, _temp_files, same_files,
               _memdec_progress)


# -- comparing outputs --------------------------------------------------------------------------

def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` by relative path (the write lock is no content)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


def same_files(reference: Path, resumed: Path) -> list[str]:
    """Files that differ, are missing or are extra: byte for byte, names included."""
    a, b = digests(reference), digests(resumed)
    return ([f"{name}: differs" for name in sorted(a.keys() & b.keys()) if a[name] != b[name]]
            + [f"{name}: missing" for name in sorted(a.keys() - b.keys())]
            + [f"{name}: extra" for name in sorted(b.keys() - a.keys())])


def json_differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Paths (a.b[3].c) where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(a.keys() | b.keys(), key=str)
                for d in json_differences(a.get(k), b.get(k), f"{where}.{k}" if where else k)]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b))
                for d in json_differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where or "(root)"]


# Manifest fields of a bank that may legitimately differ between a killed-and-resumed build and an
# uninterrupted one: none. The manifest holds no timestamp, pid or host; the encoder id is the
# checkpoint's; a resumed build cuts, names and orders segments as an unbroken one does (1 rank
# and 2). The one run-specific file is write.lock (the last writer's pid, host and start time),
# which is no part of the bank. Measured by the sweep (bench/kill_sweep.py).
BANK_RUN_SPECIFIC: tuple[str, ...] = ()


def compare_banks(reference: Path, resumed: Path) -> list[str]:
    """Both banks opened through MemoryBank.open (every file's sha256 checked against its
    manifest): the same rows, reference records, memories and search results, manifests equal
    but for BANK_RUN_SPECIFIC; then file by file."""
    import numpy as np
    import torch

    from memory3.memory import MemoryBank

    out = []
    with MemoryBank.open(reference) as a, MemoryBank.open(resumed) as b:
        if len(a) != len(b):
            return [f"{len(b)} rows, the reference has {len(a)}"]
        rows = np.arange(len(a))
        records_a, records_b = a.references(rows), b.references(rows)
        out += [f"row {r}: reference record differs" for r, (x, y) in
                enumerate(zip(records_a, records_b)) if x != y]
        warm = rows[~a.missing(rows)]
        if not np.array_equal(warm, rows[~b.missing(rows)]):
            out.append("other rows have memories")
        else:
            mem_a, mem_b = a.memories(warm), b.memories(warm)
            if not torch.equal(mem_a.kv, mem_b.kv):
                out.append("memories (kv) differ")
            if not torch.equal(mem_a.positions, mem_b.positions):
                out.append("memory positions differ")
        queries = [r.text for r in records_a]
        (ids_a, scores_a), (ids_b, scores_b) = (bank.retrieve(queries, k=min(5, len(a)))
                                                for bank in (a, b))
        if not (np.array_equal(ids_a, ids_b) and np.array_equal(scores_a, scores_b)):
            out.append("index search results differ")
        out += [f"manifest.json: {path} differs" for path in
                json_differences(a.manifest, b.manifest)
                if re.split(r"[.\[]", path)[0] not in BANK_RUN_SPECIFIC]
    return out + same_files(reference, resumed)


def _train_records(run: Path) -> list[dict[str, Any]]:
    """Every line of metrics.jsonl in order: what each attempt logged, not de-duplicated."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if line.strip()]


# What a resumed training run guarantees: the engine (weights, optimizer, schedule), the data
# position and every RNG are restored exactly from the checkpoint, and the run goes on with the
# same thread count, so a step after a resume is the same sequence of floating-point operations
# as in the uninterrupted run: the same bits. The tolerance is therefore 0; a skipped or repeated
# batch, a lost optimizer or scheduler step, or another random draw would show at once.
LOSS_TOLERANCE = 0.0
COMPARED = ("loss", "lr", "grad_norm", "val_loss", "val_loss_no_memory")


def compare_training(reference: Path, resumed: Path) -> list[str]:
    """Every record any attempt logged (also those that a later resume made obsolete) against
    the uninterrupted run's record of the same step; each attempt's steps go on one by one from
    where it resumed; every step logged; the checkpoints kept hold the same data position
    (loader epoch and batch) and the same weights."""
    import torch

    from memory3.checkpoints import MODEL_STATES

    out = []
    expected = {(r["kind"], r["step"]): r for r in _train_records(reference)}
    records = _train_records(resumed)
    last_step = 0
    for r in records:
        if r["kind"] == "train":
            if r["step"] > last_step + 1:
                out.append(f"metrics.jsonl: step {r['step']} follows step {last_step}")
            last_step = r["step"]
        want = expected.get((r["kind"], r["step"]))
        if want is None:
            out.append(f"metrics.jsonl: {r['kind']} step {r['step']} is not in the reference")
            continue
        for key in COMPARED:
            if key in want and abs(r[key] - want[key]) > LOSS_TOLERANCE * abs(want[key]):
                out.append(f"metrics.jsonl: {r['kind']} step {r['step']}: {key} {r[key]!r}, "
                           f"the reference has {want[key]!r}")
    logged = {(r["kind"], r["step"]) for r in records}
    out += [f"metrics.jsonl: {kind} step {step} never logged"
            for kind, step in sorted(expected.keys() - logged)]

    saves = [sorted(p.name for p in (run / "checkpoints").glob("step-*"))
             for run in (reference, resumed)]
    if saves[0] != saves[1]:
        out.append(f"checkpoint folders {saves[1]}, the reference has {saves[0]}")
    for tag in sorted(set(saves[0]) & set(saves[1])):
        states = [torch.load(run / "checkpoints" / tag / MODEL_STATES, map_location="cpu",
                             weights_only=False) for run in (reference, resumed)]
        if states[0]["phase"] != states[1]["phase"]:
            out.append(f"{tag}: data position {states[1]['phase']}, the reference has "
                       f"{states[0]['phase']}")
        weights = [s["module"] for s in states]
        if weights[0].keys() != weights[1].keys() or any(
                not torch.equal(weights[0][k], weights[1][k]) for k in weights[0]):
            out.append(f"{tag}: weights differ")
    return out


def resume_points(log: str) -> list[int]:
    """Steps a training run said it resumed from."""
    return [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)]


# -- running and killing -----------------------------------------------------------------------

@dataclass
class Timing:
    """The uninterrupted run: seconds from launch to its first change of the output, and from
    there to a complete output (the work window W)."""
    startup: float
    work: float


class JobFailed(AssertionError):
    pass


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, mtime, size) of every file under `folder` but the write lock: what changes when a
    job creates, replaces (a new inode), writes (also through a memory map) or deletes a file."""
    out: dict[str, tuple[int, int, int]] = {}
    stack = [folder]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif e.name != LOCK_FILE:
                    st = e.stat(follow_symlinks=False)
                    out[e.path] = (st.st_ino, st.st_mtime_ns, st.st_size)
            except FileNotFoundError:  # deleted meanwhile: a change the next look sees
                pass
    return out


def _launch(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(argv)}\n".encode())
        f.flush()
        return subprocess.Popen(argv, env=job_env(), stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:]


def _running(p: psutil.Process) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever reaps orphans here)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_tree(proc: subprocess.Popen) -> bool:
    """SIGKILL `proc` and all its descendants; True if it was still running (the kill landed)."""
    if proc.poll() is not None:
        return False
    try:
        os.kill(proc.pid, signal.SIGSTOP)  # from here on it neither ends nor starts a child
        tree = psutil.Process(proc.pid)
        family = [tree, *tree.children(recursive=True)]
    except (ProcessLookupError, psutil.NoSuchProcess):
        family = []
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    deadline = time.monotonic() + 30
    while alive := [p.pid for p in family[1:] if _running(p)]:
        if time.monotonic() > deadline:
            raise JobFailed(f"processes {alive} survived SIGKILL")
        time.sleep(POLL_SECONDS)
    return proc.returncode == -signal.SIGKILL


def _wait(proc: subprocess.Popen, job: Job, log: Path) -> None:
    try:
        proc.wait(timeout=job.timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise JobFailed(f"{job.name}: no end after {job.timeout} s\n{_tail(log)}") from None


def _wait_for_work(proc: subprocess.Popen, out: Path, before: dict, timeout: float
                   ) -> float | None:
    """Seconds from now until the process first changes its output; None if it ended first."""
    start = time.monotonic()
    while proc.poll() is None and time.monotonic() - start < timeout:
        if snapshot(out) != before:
            return time.monotonic() - start
        time.sleep(POLL_SECONDS)
    return None


def run_reference(job: Job, out: Path, log: Path) -> Timing:
    """The uninterrupted run, timed: launch -> first change of the output -> output complete."""
    argv = job.argv(out)
    before = snapshot(out)
    start = time.monotonic()
    proc = _launch(argv, log)
    startup = _wait_for_work(proc, out, before, job.timeout)
    complete = None
    while proc.poll() is None and time.monotonic() - start < job.timeout:
        if job.done(out):
            complete = time.monotonic() - start
            break
        time.sleep(POLL_SECONDS)
    _wait(proc, job, log)
    if proc.returncode != 0:
        raise JobFailed(f"{job.name}: the uninterrupted run failed ({proc.returncode})\n"
                        f"{_tail(log)}")
    total = time.monotonic() - start
    startup = total if startup is None else startup
    return Timing(startup, max((complete or total) - startup, 0.05))


@dataclass
class Kill:
    offset: float         # seconds into the attempt's work (after its first change of the output)
    landed: bool          # the job was still running, its output not complete
    progress: str = ""    # how far the output was
    torn: list[str] = field(default_factory=list)  # what the kill left half done


@dataclass
class Report:
    job: str
    points: int = 0                       # kill points drawn
    kills: list[Kill] = field(default_factory=list)  # kills tried
    attempts: int = 0                     # launches of the command
    resumed_ok: bool = False
    failure: str = ""                     # the log of an attempt that failed
    differences: list[str] = field(default_factory=list)
    seconds: float = 0.0
    resumes: list[int] = field(default_factory=list)  # training: steps resumed from
    runs: int = 0                         # runs brought to completion and compared

    @property
    def tried(self) -> int:
        return len(self.kills)

    @property
    def landed(self) -> int:
        return sum(k.landed for k in self.kills)

    @property
    def mid_write(self) -> int:
        return sum(bool(k.torn) for k in self.kills)

    @property
    def identical(self) -> bool:
        return self.resumed_ok and not self.differences

    def summary(self) -> str:
        lines = [f"{self.job}: {self.tried} kill points tried, {self.landed} landed mid-job, "
                 f"{self.mid_write} left half-written files; {self.attempts} attempts in "
                 f"{self.runs} runs, resumed {'OK' if self.resumed_ok else 'NOT OK'}, "
                 f"{'identical' if self.identical else 'NOT identical'} ({self.seconds:.0f} s)"]
        for k in self.kills:
            left = (f", left {', '.join(k.torn[:3])}" + (" ..." if len(k.torn) > 3 else "")
                    if k.torn else "")
            lines.append(f"  kill {k.offset:5.2f} s into the work: "
                         + ("landed" if k.landed else "after the end")
                         + (f" ({k.progress})" if k.progress else "") + left)
        if self.resumes:
            lines.append(f"  resumed from steps {self.resumes}")
        lines += [f"  difference: {d}" for d in self.differences[:20]]
        if self.failure:
            lines.append(f"  failed attempt:\n{self.failure}")
        return "\n".join(lines)


def kill_points(timing: Timing, kills: int, seed: int | str) -> list[float]:
    """Seconds into its work at which each kill point kills an attempt: uniform over the work
    window W of an uninterrupted run, in the seed's order (module docstring)."""
    rng = random.Random(zlib.crc32(str(seed).encode()))
    return [rng.random() * timing.work for _ in range(kills)]


def kill_and_resume(job: Job, reference: Path, out: Path, timing: Timing, *, kills: int,
                    seed: int | str, log: Path, must_land: bool = False) -> Report:
    """Try every kill point (kill_points) on a run of the job that is resumed after each kill
    with the same command, and compare each run that completes with `reference` (module
    docstring). must_land: if no kill landed mid-job, try again with the kill moments halved (up
    to 3 times), so that the caller knows something was killed."""
    started = time.monotonic()
    report = Report(job.name, points=kills)

    def attempt(offset: float | None) -> Kill | None:
        """Launch; kill `offset` seconds into its work (None: let it end). The kill, or None if
        the attempt ended by itself; an attempt that failed raises JobFailed."""
        argv = job.argv(out)
        before = snapshot(out)
        proc = _launch(argv, log)
        report.attempts += 1
        if offset is not None:
            if _wait_for_work(proc, out, before, job.timeout) is not None:
                kill_at = time.monotonic() + offset
                while proc.poll() is None and time.monotonic() < kill_at:
                    time.sleep(POLL_SECONDS)
            if kill_tree(proc):
                landed = not job.done(out)
                return Kill(offset, landed, job.progress(out) if landed else "", job.torn(out))
        _wait(proc, job, log)
        if proc.returncode != 0:
            report.failure = _tail(log)
            raise JobFailed(f"{job.name}: attempt {report.attempts} failed ({proc.returncode})")
        return None

    def finished() -> None:
        """The run in `out` is complete: compare it (its log kept as <log>-<run>)."""
        report.runs += 1
        report.differences += [f"run {report.runs}: {d}" for d in job.compare(reference, out)]
        report.resumes += resume_points(log.read_text(errors="replace"))
        log.rename(log.with_name(f"{log.stem}-{report.runs}{log.suffix}"))

    offsets = kill_points(timing, kills, seed)
    try:
        for _ in range(4):
            fresh = True  # the next attempt starts a new run
            for offset in offsets:
                while True:
                    if fresh and out.exists():
                        shutil.rmtree(out)
                    kill = attempt(offset)
                    if kill is not None and kill.landed:
                        report.kills.append(kill)
                        fresh = False
                        break
                    # The run ended before the kill (or the kill came as it was exiting).
                    finished()
                    if fresh:  # even a fresh run ends before it: nothing left to kill
                        report.kills.append(kill or Kill(offset, False))
                        break
                    fresh = True  # try the kill point again, on a fresh run
            if not fresh:
                attempt(None)
                finished()
            if report.landed or not must_land:
                break
            offsets = [o / 2 for o in offsets]
    except JobFailed as e:
        report.failure = report.failure or str(e)
        report.seconds = time.monotonic() - started
        return report
    report.resumed_ok = True
    report.seconds = time.monotonic() - started
    return report


def sweep(job: Job, root: Path, *, kills: int, seed: int | str = 0,
          must_land: bool = False) -> Report:
    """The reference run, moved aside when it ends, then kill_and_resume in the same folder:
    root/<job>-reference, root/<job> and their logs root/<job>-reference.log, root/<job>.log."""
    slug = re.sub(r"[^a-z0-9]+", "-", job.name.lower()).strip("-")
    root.mkdir(parents=True, exist_ok=True)
    out, reference = root / slug, root / f"{slug}-reference"
    timing = run_reference(job, out, root / f"{slug}-reference.log")
    out.rename(reference)
    return kill_and_resume(job, reference, out, timing, kills=kills, seed=f"{seed}:{job.name}",
                           log=root / f"{slug}.log", must_land=must_land)


# -- inputs -------------------------------------------------------------------------------------

@dataclass
class Inputs:
    shards: Path      # token shards of a generated world: training data
    tokenizer: Path   # their sentencepiece tokenizer (512 tokens)
    run: Path         # a tiny warmup checkpoint with memory layers
    corpus: Path      # folder of several worlds' text, over 1 MiB: prepare-data's input
    knowledge: Path   # folder of two worlds' knowledge: build-bank's input
    cold_bank: Path   # those references in a bank of `run`'s shape, without memories


def build_inputs(root: Path, *, shards: Path | None = None, run: Path | None = None,
                 corpus_worlds: int = 5) -> Inputs:
    """The tiny inputs of every job, under root (seconds). `shards` and `run` given are used as
    they are (the tests pass conftest's tiny_data and short_chunk_run); missing, they are made
    as conftest makes them: a generated world, a 512-token tokenizer, its shards, and 6 warmup
    steps of `tiny` with 16-token chunks."""
    from memory3.data import Tokenizer, prepare_data, train_tokenizer
    from memory3.data.synthetic import make_world, write_world
    from memory3.memory import MemoryBank, iter_references

    root.mkdir(parents=True, exist_ok=True)
    if shards is None:
        files = write_world(make_world(seed=0, n_entities=60), root / "world")
        train_tokenizer([files["corpus"]], root / "tokenizer", 512, progress=False)
        prepare_data([files["corpus"]], root / "tokenizer", root / "shards",
                     valid_fraction=0.05, progress=False)
        shards = root / "shards"
    tokenizer = Tokenizer(json.loads((shards / "manifest.json").read_text())
                          ["tokenizer"]["path"])
    if run is None:
        from memory3.config import Recipe
        from memory3.train.trainer import train
        train(Recipe.from_name("tiny-warmup").override(
            [f"data.path={shards}", "train.max_steps=6", "train.eval_every=100",
             "model.chunk_len=16", "model.memories_per_chunk=3"]), root / "run", progress=False)
        run = root / "run"
    corpus, knowledge = root / "corpus", root / "knowledge"
    corpus.mkdir(exist_ok=True)
    knowledge.mkdir(exist_ok=True)
    for seed in range(corpus_worlds):
        files = write_world(make_world(seed=seed, n_entities=60), root / f"world-{seed}")
        shutil.copy(files["corpus"], corpus / f"world-{seed}.txt")
        if seed < 2:
            shutil.copy(files["knowledge"], knowledge / f"world-{seed}.jsonl")
    cold_bank = root / "cold-bank"
    if not (cold_bank / "manifest.json").exists():
        from memory3.checkpoints import model_config
        cfg = model_config(run)
        with MemoryBank.create(cold_bank, cfg, tokenizer_sha256=tokenizer.sha256) as bank:
            bank.add(list(iter_references([knowledge], tokenizer, cfg.reference_len)))
    return Inputs(shards, tokenizer.path, run, corpus, knowledge, cold_bank)


JOBS = ("prepare-data", "build-bank", "build-bank 2 ranks", "train warmup", "train continual",
        "memdec build-datastore", "memdec build-targets")


def make_job(name: str, inputs: Inputs, work: Path) -> Job:
    """The job called `name` (one of JOBS) on `inputs`; what only it reads is made under `work`
    on first use: token shards of `inputs.corpus` (over 3 x 65,536 tokens, so three datastore
    commits) and a datastore of 8,192 positions of `inputs.shards` (build-targets' input)."""
    from memory3.data import prepare_data
    from memory3.memdec import build_datastore

    if name == "prepare-data":
        return prepare_data_job(inputs.corpus, inputs.tokenizer)
    if name.startswith("build-bank"):
        return build_bank_job(inputs.run, inputs.knowledge, ranks=2 if "2 ranks" in name else 1)
    if name == "train warmup":
        return train_job(inputs.shards)
    if name == "train continual":
        return train_job(inputs.shards, steps=20, save_every=2, eval_every=10,
                         continual=(inputs.run, inputs.cold_bank))
    if name == "memdec build-datastore":
        shards = work / "corpus-shards"
        if not (shards / "manifest.json").exists():
            prepare_data([inputs.corpus], inputs.tokenizer, shards, valid_fraction=0.05,
                         progress=False)
        return datastore_job(inputs.run, shards)
    if name == "memdec build-targets":
        datastore = work / "targets-datastore"
        if not (datastore / "manifest.json").exists():
            build_datastore(inputs.run, inputs.shards, datastore, max_tokens=8192, window=128,
                            batch_size=8, progress=False)
        return targets_job(datastore)
    raise KeyError(f"no job {name!r}; the jobs are {', '.join(JOBS)}")
