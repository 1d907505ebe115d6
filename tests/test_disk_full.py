"""Disk full (issue 14 section 3): every long job, run as the real command on tiny inputs under a
real limit on what it may write, stops with one clear line when the limit is hit mid-job, leaves
what it committed before intact and valid, and, run again without the limit, resumes to the
output of an uninterrupted run.

The limit is the file size limit by default (RLIMIT_FSIZE, `ulimit -f`, SIGXFSZ ignored): a write
past it fails with EFBIG, as one past a full disk fails with ENOSPC, and it needs no privilege.
It caps each file, not the total, so each test picks it from the sizes of an uninterrupted run
(the reference) to fall where the job has committed some work: on a token shard, on a bank's
growing manifest, on an index written once all else is in, on a checkpoint save after an earlier
one. A small tmpfs, mounted in a mount namespace of its own (`unshare`), gives a true ENOSPC on the
total; those tests are skipped where mounting is not permitted.

By default: prepare-data failing on a shard, build-bank on its manifest, train on its first save,
and the shared writer itself. `-m slow`: prepare-data on its manifest, build-bank on its index,
train after a checkpoint (resumed, compared step by step), memdec build-datastore on its index,
and train and build-bank on a full tmpfs.

Jobs, inputs and comparisons are the kill harness's (tests/kill_harness.py). The references of
prepare-data, build-bank and the datastore are made in this process (one torch thread, as the
jobs run): the same bytes as the command writes, in a fraction of its start-up time.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kill_harness import (build_bank_job, build_inputs, compare_banks, compare_training,
                          datastore_job, job_env, kill_tree, manifest_of, prepare_data_job,
                          same_files, train_job)
from memory3.checkpoints import latest_tag
from memory3.files import NO_SPACE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Runs `python -m memory3 ...` (argv[2:]) with its file size limit set to argv[1] bytes. An exec
# wrapper rather than subprocess's preexec_fn, which is unsafe in a process with threads (torch's).
LIMITED = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           "n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
           "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")


@pytest.fixture(scope="module")
def inputs(tiny_data, short_chunk_run, tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("disk_full_inputs"), shards=tiny_data,
                        run=short_chunk_run[0])


# -- running a job under a limit ------------------------------------------------------------------

def run(argv: list[str], *, limit: int | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """The job's command (kill_harness argv: python -m memory3 ...), with a file size limit."""
    if limit is not None:
        argv = [sys.executable, "-c", LIMITED, str(limit), *argv[1:]]
    return subprocess.run(argv, env=job_env(), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def shown(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def completes(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, shown(proc)


def refused(proc: subprocess.CompletedProcess, written: str) -> str:
    """The job stopped with exit status 2, no traceback, and one error line that names the file
    it was writing (regex `written`) and says the disk is full or the file too large."""
    assert proc.returncode == 2, shown(proc)
    assert "Traceback" not in proc.stderr, shown(proc)
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, shown(proc)
    line = errors[0]
    assert re.search(rf"error: cannot write (checkpoint )?{written}: ", line), line
    assert NO_SPACE in line and "run the same command again to resume" in line, line
    print(line)
    return line


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def no_temp_files(out: Path) -> None:
    assert not list(out.rglob("*.tmp")), sorted(map(str, out.rglob("*.tmp")))


def largest(folder: Path, pattern: str) -> int:
    return max(p.stat().st_size for p in folder.glob(pattern))


# -- prepare-data -------------------------------------------------------------------------------

def prepared_reference(inputs, folder: Path, shard_tokens: int) -> Path:
    from memory3.data import prepare_data
    prepare_data([inputs.corpus], inputs.tokenizer, folder, shard_tokens=shard_tokens,
                 valid_fraction=0.05, workers=1, progress=False)
    return folder


def committed_shards(out: Path, reference: Path) -> list[str]:
    """The shards out's manifest lists: each must match its sha256 there and be the reference's
    shard of the same name, byte for byte (its .crc too). Returns their names."""
    manifest = manifest_of(out)
    assert manifest is not None and not manifest["complete"]
    names = []
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            assert sha256(out / shard["file"]) == shard["sha256"], shard["file"]
            crc = shard["file"][:-4] + ".crc"
            assert sha256(out / crc) == shard["crc_sha256"], crc
            for name in (shard["file"], crc):
                assert sha256(out / name) == sha256(reference / name), name
            names.append(shard["file"])
    return names


def test_prepare_data_stops_on_a_shard_and_resumes(inputs, tmp_path):
    """The limit just under the largest shard: the job commits shards until it writes that one."""
    job = prepare_data_job(inputs.corpus, inputs.tokenizer)  # 16,384-token shards
    reference = prepared_reference(inputs, tmp_path / "reference", 16384)
    out = tmp_path / "out"
    limit = largest(reference, "*.bin") - 1
    line = refused(run(job.argv(out), limit=limit),
                   rf"{re.escape(str(out))}/(train|valid)-\d{{5}}\.bin")
    failed = re.search(r"((train|valid)-\d{5}\.bin)", line).group(1)
    assert (reference / failed).stat().st_size > limit
    committed = committed_shards(out, reference)
    assert committed and failed not in committed, (committed, failed)
    assert not (out / failed).exists()
    no_temp_files(out)

    completes(run(job.argv(out)))
    assert same_files(reference, out) == []


@pytest.mark.slow
def test_prepare_data_stops_on_its_manifest_and_resumes(inputs, tmp_path):
    """4,096-token shards, under a limit the manifest outgrows: the commit that fails leaves the
    previous manifest; the shard it would have listed is cleaned up by the resumed run."""
    job = prepare_data_job(inputs.corpus, inputs.tokenizer, shard_tokens=4096)
    reference = prepared_reference(inputs, tmp_path / "reference", 4096)
    out = tmp_path / "out"
    limit = (largest(reference, "*.bin") + (reference / "manifest.json").stat().st_size) // 2
    refused(run(job.argv(out), limit=limit), re.escape(str(out / "manifest.json")))
    assert len(committed_shards(out, reference)) >= 10
    no_temp_files(out)

    completes(run(job.argv(out)))
    assert same_files(reference, out) == []


# -- build-bank ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bank_reference(inputs, tmp_path_factory) -> Path:
    from memory3.memory.build import build_bank
    folder = tmp_path_factory.mktemp("disk_full_bank") / "reference"
    build_bank(inputs.run, [inputs.knowledge], folder, shard_memories=6, batch_size=3,
               progress=False)
    return folder


def check_committed_bank(out: Path, reference: Path) -> int:
    """out's committed bank passes `verify_bank` (every file's sha256, every record's CRC32),
    its build is not complete, and every segment it lists is the reference's, byte for byte.
    Returns the number of rows committed."""
    from memory3.memory.verify import verify_bank

    problems, _ = verify_bank(out)
    assert problems == []
    manifest = manifest_of(out)
    assert not manifest["builds"][-1]["complete"]
    listed = [f"{e['name']}.{kind}" for e in manifest["segments"] for kind in e["files"]]
    for name in listed:
        assert sha256(out / "shards" / name) == sha256(reference / "shards" / name), name
    return manifest["rows"]


def test_build_bank_stops_on_its_manifest_and_resumes(inputs, bank_reference, tmp_path):
    """Segments of 6 memories, a commit each, under a limit above every segment file that the
    growing manifest reaches mid-build."""
    job = build_bank_job(inputs.run, inputs.knowledge)
    out = tmp_path / "bank"
    limit = (largest(bank_reference / "shards", "*") +
             (bank_reference / "manifest.json").stat().st_size) // 2
    refused(run(job.argv(out), limit=limit), re.escape(str(out / "manifest.json")))
    rows = check_committed_bank(out, bank_reference)
    assert 0 < rows < manifest_of(bank_reference)["rows"]  # mid-build
    no_temp_files(out)

    completes(run(job.argv(out)))
    assert compare_banks(bank_reference, out) == []


@pytest.mark.slow
def test_build_bank_stops_on_its_index_and_resumes(inputs, bank_reference, tmp_path):
    """The index (written once every segment is committed) is the one file over the limit."""
    job = build_bank_job(inputs.run, inputs.knowledge)
    out = tmp_path / "bank"
    index = next(bank_reference.glob("index-*.faiss"))
    limit = index.stat().st_size - 1
    assert limit > largest(bank_reference / "shards", "*")
    refused(run(job.argv(out), limit=limit), re.escape(str(out / index.name)))
    assert check_committed_bank(out, bank_reference) == manifest_of(bank_reference)["rows"]
    assert manifest_of(out)["index"] is None and not (out / index.name).exists()
    no_temp_files(out)

    completes(run(job.argv(out)))
    assert compare_banks(bank_reference, out) == []


# -- train --------------------------------------------------------------------------------------

def checkpoint_files(run_dir: Path) -> dict[str, str]:
    """sha256 of every file of the complete checkpoints (those with memory3.json) of a run."""
    saves = run_dir / "checkpoints"
    return {str(p.relative_to(run_dir)): sha256(p)
            for info in sorted(saves.glob("step-*/memory3.json"))
            for p in sorted(info.parent.rglob("*")) if p.is_file()}


def check_checkpoints(run_dir: Path) -> str | None:
    """No partial step folder; DeepSpeed's `latest` names the newest complete save (if any),
    which loads with its files checked. Returns its tag."""
    from memory3.checkpoints import load_state_dict

    saves = run_dir / "checkpoints"
    partial = [p.name for p in saves.glob("step-*") if not (p / "memory3.json").exists()]
    assert partial == []
    tag = latest_tag(saves)
    if (saves / "latest").exists():
        assert (saves / "latest").read_text().strip() == tag
    if tag is not None:
        load_state_dict(saves / tag)  # checks every listed file's size and sha256
    return tag


def check_metrics(run_dir: Path) -> None:
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_train_stops_on_its_first_save(inputs, tmp_path):
    """A limit under the optimizer states' file: the first save fails; its partial folder is
    removed, nothing claims a checkpoint, the metrics so far are whole lines."""
    job = train_job(inputs.shards, steps=4, save_every=2, eval_every=100)
    out = tmp_path / "run"
    limit = largest(inputs.run / "checkpoints", "step-*/*.pt") - 1  # the same model's
    refused(run(job.argv(out), limit=limit),
            re.escape(str(out / "checkpoints" / "step-00000002")))
    assert check_checkpoints(out) is None
    check_metrics(out)
    no_temp_files(out)


def run_until_saved(argv: list[str], out: Path, tag: str, timeout: float = 300) -> None:
    """Start the job, SIGKILL it once checkpoint `tag` is complete (the kill harness's kill)."""
    proc = subprocess.Popen(argv, env=job_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while (latest_tag(out / "checkpoints") or "") < tag:
        assert proc.poll() is None and time.monotonic() < deadline, "ended before the save"
        time.sleep(0.005)
    assert kill_tree(proc), "the run ended before it could be killed"


@pytest.mark.slow
def test_train_stops_on_a_save_and_resumes_from_the_one_before(inputs, tmp_path):
    """A run killed after its step-2 save resumes under a limit its next save cannot fit: that
    save fails, step 2 stays the newest checkpoint, unchanged; without the limit the run resumes
    from it and ends as an uninterrupted run (every step's loss, the data position, weights)."""
    job = train_job(inputs.shards, steps=8, save_every=2, eval_every=4)
    reference, out = tmp_path / "reference", tmp_path / "run"
    completes(run(job.argv(reference)))
    run_until_saved(job.argv(out), out, "step-00000002")
    before = checkpoint_files(out)
    tag = latest_tag(out / "checkpoints")

    limit = largest(reference / "checkpoints", "step-*/*.pt") - 1
    refused(run(job.argv(out), limit=limit), re.escape(str(out / "checkpoints")) + r"/step-\d{8}")
    assert check_checkpoints(out) == tag
    assert checkpoint_files(out) == before
    check_metrics(out)

    completes(run(job.argv(out)))
    assert compare_training(reference, out) == []


# -- memdec build-datastore -----------------------------------------------------------------------

@pytest.mark.slow
def test_build_datastore_stops_on_its_index_and_resumes(inputs, tmp_path):
    """73,728 positions (commits at 65,536 and at the end), then the flat index, twice the size
    of the keys, over the limit: every key is committed, the index is written on resume."""
    import numpy as np

    from memory3.memdec import build_datastore

    positions = 65536 + 8192
    job = datastore_job(inputs.run, inputs.shards, positions=positions)
    reference, out = tmp_path / "reference", tmp_path / "datastore"
    build_datastore(inputs.run, inputs.shards, reference, max_tokens=positions, window=128,
                    batch_size=8, index="flat", progress=False)
    keys, index = (reference / "keys.bin").stat().st_size, (reference / "index.faiss").stat().st_size
    refused(run(job.argv(out), limit=(keys + index) // 2), re.escape(str(out / "index.faiss")))
    manifest = manifest_of(out)
    assert not manifest["complete"] and manifest["done_positions"] == positions
    for name in ("keys.bin", "values.bin"):
        assert np.array_equal(np.fromfile(out / name, np.uint8),
                              np.fromfile(reference / name, np.uint8)), name
    assert not (out / "index.faiss").exists()
    no_temp_files(out)

    completes(run(job.argv(out)))
    assert same_files(reference, out) == []


# -- the shared writer ----------------------------------------------------------------------------

WRITER = """
import sys
from pathlib import Path
from memory3.files import no_space_as, write_atomic
target = Path(sys.argv[1])
try:
    write_atomic(target, b"x" * 100_000)
except OSError as e:
    print("oserror", e.errno, e.filename)
try:
    with no_space_as(ValueError):
        write_atomic(target, b"x" * 100_000)
except ValueError as e:
    print("error", e)
"""


def test_write_atomic_keeps_the_old_file_and_names_the_target(tmp_path):
    """Over the limit, write_atomic removes its temp file, leaves the target as it was, and
    raises an OSError naming the target (not the temp), which no_space_as turns into the job's
    error type, one line naming the target."""
    import errno

    target = tmp_path / "manifest.json"
    target.write_text("committed\n")
    proc = subprocess.run([sys.executable, "-c", LIMITED, "50000", "-c", WRITER, str(target)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, shown(proc)
    first, second = proc.stdout.splitlines()
    assert first == f"oserror {errno.EFBIG} {target}"
    assert second.startswith(f"error cannot write {target}: {NO_SPACE}")
    assert target.read_text() == "committed\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_a_torn_metrics_record_is_dropped_on_resume(tmp_path):
    """A disk that fills up mid-line leaves half a record: the next run cuts it off before it
    appends, so every line stays JSON."""
    from memory3.train.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "tra')
    log = MetricsLog(tmp_path)
    log.log(kind="train", step=2, loss=1.0)
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


# -- a full tmpfs -------------------------------------------------------------------------------

# Mounts a tmpfs of SIZE bytes over OUT in a mount namespace of its own, with OUT's content copied
# in, runs the command there, and copies OUT's content back out when it ends (the namespace and
# its tmpfs end with it). Exit status 97: no mount.
TMPFS = r"""
set -u
out=$1; size=$2; saved=$3; shift 3
mkdir -p "$out" "$saved" && cp -a "$out"/. "$saved"/ || exit 98
mount -t tmpfs -o size="$size" memory3-test "$out" || exit 97
cp -a "$saved"/. "$out"/ || exit 98
"$@"; rc=$?
rm -rf "$saved" && mkdir "$saved" && cp -a "$out"/. "$saved"/ || exit 98
exit $rc
"""


def run_on_tmpfs(argv: list[str], out: Path, size: int) -> subprocess.CompletedProcess:
    saved = out.with_name(out.name + "-tmpfs")
    proc = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", TMPFS, "sh",
                           str(out), str(size), str(saved), *argv], env=job_env(),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    if proc.returncode in (97, 98):
        raise AssertionError(f"tmpfs wrapper failed\n{shown(proc)}")
    shutil.rmtree(out)
    saved.rename(out)
    return proc


@pytest.fixture(scope="module")
def tmpfs(tmp_path_factory) -> None:
    """Skip unless a tmpfs can be mounted in a mount namespace here."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare command")
    probe = tmp_path_factory.mktemp("tmpfs_probe")
    proc = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c",
                           f"mount -t tmpfs -o size=65536 memory3-test {probe}"],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")


@pytest.mark.slow
def test_train_on_a_full_tmpfs_resumes_from_the_save_before(inputs, tmpfs, tmp_path):
    """A tmpfs that holds one checkpoint and a half: the step-2 save fits, the step-4 save runs
    out of space (ENOSPC, inside torch.save); its partial folder is removed, step 2 stays the
    newest save, and the run, moved off the tmpfs, resumes to the uninterrupted run's end."""
    job = train_job(inputs.shards, steps=6, save_every=2, eval_every=3)
    reference, out = tmp_path / "reference", tmp_path / "run"
    completes(run(job.argv(reference)))
    one_save = sum(p.stat().st_size for p in (reference / "checkpoints").glob("step-*/*")
                   if p.parent.name == latest_tag(reference / "checkpoints"))
    proc = run_on_tmpfs(job.argv(out), out, one_save * 3 // 2 + 256 * 1024)
    refused(proc, re.escape(str(out / "checkpoints" / "step-00000004")))
    assert check_checkpoints(out) == "step-00000002"
    check_metrics(out)

    completes(run(job.argv(out)))
    assert compare_training(reference, out) == []


@pytest.mark.slow
def test_build_bank_on_a_full_tmpfs_resumes(inputs, bank_reference, tmpfs, tmp_path):
    """A tmpfs of half the bank: the build stops on whichever file meets the full disk."""
    job = build_bank_job(inputs.run, inputs.knowledge)
    out = tmp_path / "bank"
    size = sum(p.stat().st_size for p in bank_reference.rglob("*") if p.is_file())
    proc = run_on_tmpfs(job.argv(out), out, size // 2)
    refused(proc, re.escape(str(out)) + r"/\S+")
    assert check_committed_bank(out, bank_reference) > 0
    no_temp_files(out)

    completes(run(job.argv(out)))
    assert compare_banks(bank_reference, out) == []
