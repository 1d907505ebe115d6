"""Kill at any point (issue 14 section 1): every long job, run as the real command on tiny inputs,
is SIGKILLed at seeded-random moments, resumed with the same command until it completes, and
compared with an uninterrupted run (tests/kill_harness.py says how and what is compared).

By default one kill, which must land mid-job, on the cheapest jobs (prepare-data, build-bank,
memdec build-targets); `-m slow` sweeps every job, 2-rank build-bank and continual training
included, with KILLS kill points each (bench/kill_sweep.py prints the same sweep as a table).
Then tests of the harness itself (its kills kill, its comparisons see differences) and of what
the sweep found: a resumed multi-rank build-bank can delete a segment another rank is writing.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import psutil
import pytest

from kill_harness import (JOBS, build_bank_job, build_inputs, compare_training, job_env, kill_tree,
                          make_job, manifest_of, same_files, sweep)
from memory3.data import Tokenizer
from memory3.memory import MemoryBank, iter_references
from memory3.memory.build import SLOW_SHARD_ENV

KILLS = 8  # kill points per job in the slow sweep
SEED = 0


@pytest.fixture(scope="module")
def inputs(tiny_data, short_chunk_run, tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("kill_inputs"), shards=tiny_data,
                        run=short_chunk_run[0])


@pytest.fixture(scope="module")
def job(inputs, tmp_path_factory):
    """Job name -> the Job (kill_harness.make_job), its own inputs made on first use."""
    work = tmp_path_factory.mktemp("kill_job_inputs")
    return lambda name: make_job(name, inputs, work)


def check(report) -> None:
    print(report.summary())
    assert report.resumed_ok, report.summary()
    assert report.landed >= 1, report.summary()
    assert report.identical, report.summary()


def _id(name: str) -> str:
    return name.replace(" ", "-")


@pytest.mark.parametrize("name", ["prepare-data", "build-bank", "memdec build-targets"], ids=_id)
def test_a_killed_job_resumes_to_the_uninterrupted_output(name, job, tmp_path):
    check(sweep(job(name), tmp_path, kills=1, seed=SEED, must_land=True))


def _slow(name: str):
    marks = [pytest.mark.slow]
    if "ranks" in name:
        marks.append(pytest.mark.distributed)
    return pytest.param(name, marks=marks, id=_id(name))


@pytest.mark.parametrize("name", [_slow(name) for name in JOBS])
def test_kill_sweep(name, job, tmp_path):
    check(sweep(job(name), tmp_path, kills=KILLS, seed=SEED))


# -- the harness itself: its kills kill, its comparisons see a difference ------------------------

def test_kill_tree_kills_children_in_sessions_of_their_own(tmp_path):
    """As torchrun's ranks are: a kill of the launcher's process group would miss them."""
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)'], start_new_session=True); print('up', flush=True); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "up"
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) == 1 and children[0].pid != proc.pid
    started = time.monotonic()
    assert kill_tree(proc)
    assert proc.returncode == -9 and time.monotonic() - started < 10
    assert not children[0].is_running() or children[0].status() == psutil.STATUS_ZOMBIE
    assert not kill_tree(proc)  # ended already: a kill that does not land


def test_comparisons_see_a_changed_loss_a_skipped_step_and_a_changed_byte(short_chunk_run,
                                                                           tmp_path):
    run = short_chunk_run[0]
    assert compare_training(run, run) == []
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    third = next(i for i, r in enumerate(records) if r["kind"] == "train" and r["step"] == 3)
    records[third]["loss"] += 1e-7
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert compare_training(run, copy) == [
        f"metrics.jsonl: train step 3: loss {records[third]['loss']!r}, the reference has "
        f"{json.loads(lines[third])['loss']!r}"]
    del records[third]  # step 3 lost: the step after it follows step 2
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert compare_training(run, copy) == ["metrics.jsonl: step 4 follows step 2",
                                           "metrics.jsonl: train step 3 never logged"]
    shutil.copy(run / "metrics.jsonl", copy / "metrics.jsonl")
    assert same_files(run, copy) == []
    weights = next((copy / "checkpoints").glob("step-*/mp_rank_00_model_states.pt"))
    data = bytearray(weights.read_bytes())
    data[-100] ^= 1
    weights.write_bytes(bytes(data))
    assert same_files(run, copy) == [f"{weights.relative_to(copy)}: differs"]


# -- what the sweep found ------------------------------------------------------------------------

RANK0_SLOW_CLEANUP = '''
"""memory3 build-bank with rank 0's clean-up of what a killed build left delayed by {delay} s."""
import os
import sys
import time

from memory3.memory import store

clean = store.MemoryStore._remove_uncommitted


def delayed(self):
    if os.environ.get("RANK") == "0":
        time.sleep({delay})
    clean(self)


store.MemoryStore._remove_uncommitted = delayed
from memory3.memory.cli import main  # noqa: E402
main(sys.argv[1:])
'''


@pytest.mark.distributed
def test_a_resumed_two_rank_build_keeps_what_rank_1_is_writing(inputs, tmp_path):
    """A 2-rank build killed after its first commit, then resumed. Every round, rank 1 writes its
    next segment while rank 0 commits the last one. On resume, rank 0's first commit takes the
    bank's write lock, which deletes what the killed build left (segment files no manifest
    lists), rank 1's segment under way included: rank 1's rename of it fails, or the next commit
    lists it and rank 0 fails on its missing files (FileNotFoundError). On 2 busy cores 1 resume
    in 6 failed so; here rank 0 is 2 s slower where it cleans up (as with a long listing of a big
    shards folder, a slow disk, a busy CPU), which failed every time before the fix (build.py):
    rank 0 takes the lock, and so cleans up, before the barrier, while no rank writes yet."""
    job = build_bank_job(inputs.run, inputs.knowledge, ranks=2)
    out = tmp_path / "bank"
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(job.argv(out), env={**job_env(), SLOW_SHARD_ENV: "0.5"},
                                stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 120
    while len((manifest_of(out) or {}).get("segments", [])) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "build ended before a commit"
        time.sleep(0.005)
    assert kill_tree(proc)
    assert not manifest_of(out)["builds"][0]["complete"]

    launcher = tmp_path / "slow_cleanup.py"
    launcher.write_text(RANK0_SLOW_CLEANUP.format(delay=2))
    argv = job.argv(out)
    resume = [*argv[:argv.index("-m", 3)], str(launcher), *argv[argv.index("build-bank") + 1:]]
    done = subprocess.run(resume, env=job_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    bank = MemoryBank.open(out)
    assert len(bank) == len(list(iter_references([inputs.knowledge], Tokenizer(inputs.tokenizer),
                                                 bank.layout.reference_len)))
