"""bench/gpu_check.sh on CPU: its syntax, its arguments, its clear exit without a GPU, and that
every command its --dry-run lists names a file and flags that exist (each is parsed by the
argparse of the program it runs, and recipe overrides by Recipe.override) and every Python
snippet compiles. What it measures needs a GPU; nothing here runs a stage."""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
STAGES = ["tests", "train", "decode", "continual", "throughput"]
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}


def gpu_check(*args: str, env=NO_GPU) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60, env=env)


def dry_run(tmp_path: Path, *args: str) -> tuple[dict[str, list[list[str]]], dict[str, str]]:
    """({stage: [command argv...]}, {snippet name: code}) as --dry-run prints them."""
    proc = gpu_check("--dry-run", str(tmp_path / "out"), "--work", str(tmp_path / "work"), *args)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
    stages, snippets, section = {}, {}, None
    for line in proc.stdout.splitlines():
        if line.startswith("## stage "):
            section = stages.setdefault(line.split()[2], [])
        elif line.startswith("## snippet "):
            name = line.split()[2]
            snippets[name], section = "", None
        elif line.startswith("$ "):
            section.append(shlex.split(line[2:], comments=True))
        elif line.startswith("#   ") or line == "#":
            snippets[name] += line[4:] + "\n"
    return stages, snippets


def test_the_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_help_names_every_stage_and_exits_0():
    proc = gpu_check("--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: bench/gpu_check.sh")
    for stage in STAGES:
        assert f"\n  {stage} " in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown option --bogus"),
    (["--only", "tests,nope"], "unknown stage 'nope'"),
    (["--time-limit", "soon"], "--time-limit takes seconds"),
    (["--work"], "--work needs a value"),
    (["a", "b"], "one output folder"),
])
def test_bad_usage_exits_64(args, message):
    proc = gpu_check(*args)
    assert proc.returncode == 64 and message in proc.stderr


def test_without_a_gpu_it_says_so_and_exits_2_having_written_nothing(tmp_path):
    proc = gpu_check(str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "gpu_check: no CUDA GPU" in proc.stderr and "nothing was run" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_only_selects_stages(tmp_path):
    stages, _ = dry_run(tmp_path, "--only", "throughput", "--only", "tests")
    assert list(stages) == ["tests", "throughput"]


def load_bench(script: Path):
    """A bench script as a module (its own sys.path edits undone), for its parse_args."""
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location(f"gpu_check_{script.stem}", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def check_parses(argv: list[str], parse, what: str):
    try:
        return parse(argv)
    except SystemExit as e:  # argparse's way of refusing
        pytest.fail(f"{what} does not parse {argv}: exit {e.code}")


def check_memory3(argv: list[str]):
    from memory3.cli import build_parser
    from memory3.config import Recipe
    args = check_parses(argv, build_parser().parse_args, "memory3")
    if args.command == "train":  # every override names a real field with a valid value
        Recipe.from_name(args.recipe).override(args.overrides)


def test_dry_run_lists_every_stage_and_every_command_parses(tmp_path):
    stages, snippets = dry_run(tmp_path)
    assert list(stages) == STAGES and all(stages.values())
    assert set(snippets) == {"MAKE_DATA", "CUDA_SHIM", "SUMMARY"}
    for name, code in snippets.items():
        compile(code, name, "exec")
    benches = {}
    for stage, commands in stages.items():
        for argv in commands:
            if argv[:3] == ["env", "-u", "TRITON_INTERPRET"]:
                argv = argv[3:]
            assert argv[0] == sys.executable, argv
            rest = argv[1:]
            if rest[:2] == ["-m", "pytest"]:
                files = [a for a in rest if a.endswith(".py")]
                assert files and all((REPO / f).is_file() for f in files), rest
            elif rest[:2] == ["-m", "deepspeed.launcher.runner"]:
                at = rest.index("--module")
                assert rest[2:4] == ["--num_gpus", "1"] and rest[at + 1] == "memory3", rest
                check_memory3(rest[at + 2:])
            elif rest[:2] == ["-m", "memory3"]:
                check_memory3(rest[2:])
            elif rest[:2] == ["-c", "$MAKE_DATA"]:
                root, *numbers = rest[2:]
                assert len(numbers) == 3 and all(n.isdigit() for n in numbers), rest
            else:
                if rest[:2] == ["-c", "$CUDA_SHIM"]:
                    rest = rest[2:]
                script = REPO / rest[0]
                assert script.is_file() and script.parent.name == "bench", rest
                if script not in benches:
                    benches[script] = load_bench(script)
                check_parses(rest[1:], benches[script].parse_args, rest[0])
    assert {s.name for s in benches} == {"decode_memory.py", "continual_step.py",
                                         "train_throughput.py"}


def test_the_report_reads_what_the_stages_print(tmp_path):
    """SUMMARY on logs in the formats the benches print and a run's metrics.jsonl."""
    _, snippets = dry_run(tmp_path)

    def summary(*args) -> str:
        return subprocess.run([sys.executable, "-c", snippets["SUMMARY"], *map(str, args)],
                              capture_output=True, text=True, check=True).stdout.strip()

    log = tmp_path / "stage.log"
    log.write_text("===== 14 passed, 2 skipped in 31.20s =====\n")
    assert summary("pytest", log) == "14 passed, 2 skipped in 31.20s"
    log.write_text("side            median s    min s  tokens/s (median)\n"
                   "none               2.247    2.220              113.9\n"
                   "memory             2.330    2.251              109.9\n"
                   "rag                4.452    4.278               57.5\n"
                   "ratio memory/none (tokens/s): 0.965x (median of per-rep ratios 0.985x)\n"
                   "ratio memory/rag (tokens/s): 1.911x (median of per-rep ratios 1.887x)\n")
    assert summary("decode", log) == ("none 113.9 tok/s; memory 109.9 tok/s; rag 57.5 tok/s; "
                                      "memory/none 0.965x; memory/rag 1.911x")
    log.write_text("warmup             2.2830      1.6777               0.0002\n"
                   "continual          2.9301      2.2208               0.0141\n"
                   "ratio continual/warmup: 1.283x (median of per-pair ratios: 1.289x)\n")
    assert summary("continual", log) == ("warmup 2.2830 s/step; continual 2.9301 s/step; "
                                         "continual/warmup 1.283x")
    log.write_text("# train_throughput: preset=small (18.9M params) batch=4 seq_len=512 "
                   "dtype=bf16 threads=2 steps=20 warmup=3 hf_attn=sdpa\n"
                   "ours             1.6980      0.5556                1206\n"
                   "hf               1.7620      0.5589                1162\n"
                   "ratio ours/hf (tokens/s): 1.038x (median of per-pair ratios: 1.055x)\n")
    assert summary("throughput", log, 1e12) == ("small 4x512 ours 1,206 tok/s (MFU~13.7%) "
                                                "hf 1,162 ours/hf 1.038x")
    run = tmp_path / "warmup"
    run.mkdir()
    steps = [dict(kind="train", step=s, loss=9.0 - s / 10, tokens_per_s=1000.0 * s,
                  peak_memory_gb=1.5, mfu=0.01) for s in range(1, 31)]
    run.joinpath("metrics.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in [*steps, dict(kind="eval", step=30, val_loss=6.0,
                                                   val_memory_gain=0.02)]))
    assert summary("metrics", run, tmp_path / "never_ran") == (
        "warmup 30 steps 20,500 tok/s MFU 1.00% peak 1.50 GB loss 8.90->6.00 memory gain "
        "+0.0200; never_ran: no steps logged")


def test_a_failed_stage_is_reported_and_the_next_still_runs(tmp_path):
    """The real (not dry) path with a stand-in for python: it claims a GPU, the warmup run
    fails, every other command succeeds; the summary snippet runs for real."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
case "$*" in
    *torch.cuda.is_available*) echo "Stand-in GPU, 1 GiB, torch 0 (CUDA 0)" ;;
    *importlib.util*) echo ;;
    *"from importlib import metadata"*) echo "triton 0" ;;
    *"kind, args = sys.argv"*) exec {shlex.quote(sys.executable)} "$@" ;;
    *-m\\ pytest*) echo "===== 3 passed in 1.00s =====" ;;
    *small-warmup*) echo "warmup crashed"; exit 3 ;;
    *) echo "ratio memory/none (tokens/s): 0.950x" ;;
esac
""")
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc = gpu_check(str(out), "--only", "tests,train,decode",
                     env={**NO_GPU, "PYTHON": str(fake)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = (out / "report.txt").read_text()
    assert "Stand-in GPU" in report
    rows = {line.split()[0]: line for line in report.splitlines()[-4:]}
    assert "ok" in rows["tests"] and "3 passed in 1.00s" in rows["tests"]
    assert "FAILED (warmup exit 3)" in rows["train"]
    assert "no steps logged" in rows["train"]
    assert "ok" in rows["decode"] and "memory/none 0.950x" in rows["decode"]
    train_log = (out / "train.log").read_text()
    assert "warmup crashed" in train_log and "[gpu_check: exit status 3]" in train_log
    assert "--recipe small-continual" in train_log  # the bank and continual run still ran
    assert sorted(p.name for p in out.iterdir()) == ["decode.log", "report.txt", "tests.log",
                                                     "train.log", "work"]
