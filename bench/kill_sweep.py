"""Kill at any point, swept (issue 14 section 1): every long job of tests/kill_harness.py, on tiny
inputs, run as the real command, SIGKILLed at N seeded-random moments spread over its work and
re-run with the same command until it completes, then compared with an uninterrupted run. Prints
a markdown table: per job the kill points tried, the kills that landed mid-job, those that left
half-written files behind (temp files, files no manifest lists, a checkpoint without its
memory3.json), whether every resume ran and whether the output is identical. Details per kill go
to stderr. Exit status 1 if a resume failed or an output differs.

    python bench/kill_sweep.py [--kills N] [--seed S] [--jobs 'prepare-data,train warmup']
                               [--root DIR]

The same sweep is `python -m pytest -m slow tests/test_kill_anywhere.py` (8 kill points a job).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from kill_harness import JOBS, build_inputs, make_job, sweep  # noqa: E402
from stdout_aside import stdout_aside  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=8, help="kill points per job (default 8)")
    parser.add_argument("--seed", default="0", help="seed of the kill moments (default 0)")
    parser.add_argument("--jobs", default=",".join(JOBS),
                        help=f"comma-separated, of: {', '.join(JOBS)} (default: all)")
    parser.add_argument("--root", help="working folder (default: a temporary one, removed after)")
    args = parser.parse_args()
    names = [n.strip() for n in args.jobs.split(",") if n.strip()]
    unknown = [n for n in names if n not in JOBS]
    if unknown:
        parser.error(f"unknown job(s) {unknown}; the jobs are {', '.join(JOBS)}")
    with tempfile.TemporaryDirectory(prefix="kill_sweep_") as tmp:
        root = Path(args.root or tmp).resolve()
        started = time.perf_counter()
        with stdout_aside():  # training the inputs' checkpoint prints
            inputs = build_inputs(root / "inputs")
            jobs = [make_job(name, inputs, root / "inputs") for name in names]
        print(f"inputs made in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        rows, failed = [], False
        for job in jobs:
            report = sweep(job, root / "sweep", kills=args.kills, seed=args.seed)
            print(report.summary(), file=sys.stderr, flush=True)
            failed |= not report.identical
            rows.append(f"| {report.job} | {report.tried} | {report.landed} | {report.mid_write} "
                        f"| {'yes' if report.resumed_ok else 'NO'} "
                        f"| {'yes' if report.identical else 'NO'} | {report.seconds:.0f} |")
        print(f"kill sweep: {args.kills} kill points per job, seed {args.seed}, "
              f"{time.perf_counter() - started:.0f} s in all\n")
        print("| job | kill points tried | landed mid-job | left half-written files "
              "| resumed OK | identical | seconds |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(rows))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
