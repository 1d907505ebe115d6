"""Bad input, tabled (issue 14 section 4): run every case of tests/bad_input_cases.py (the slow
ones too) and print a markdown table: the input, the command, the first line of its message and
its exit status. The same cases are the tests of tests/test_bad_inputs.py.

    python bench/bad_inputs.py [--root DIR]

Commands run from the fixture folder (DIR, default a temporary folder), so their paths are
relative to it; in the messages that folder is shown as `.../`. A run takes about 1.5 minutes on
2 CPU cores.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bad_input_cases import CASES, build_fixtures, run_case  # noqa: E402
from stdout_aside import stdout_aside  # noqa: E402


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="fixture folder (default: a temporary one, removed after)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bad_inputs_") as tmp:
        root = Path(args.root or tmp).resolve()
        started = time.perf_counter()
        with stdout_aside():  # building the fixtures trains and prints
            build_fixtures(root)
        print(f"fixtures built in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        rows, gaps, failed = [], [], []
        for case in CASES:
            result = run_case(case, root)
            text = result.stdout if case.exit == 0 else result.stderr
            ok = (result.returncode == case.exit and "Traceback" not in result.stderr
                  and any(re.search(case.message, line) for line in text.splitlines())
                  and not result.changed)
            if not ok and not case.gap:
                failed.append(case.id)
            message = result.message.replace(f"{root}/", ".../")
            mark = ""
            if case.gap:
                gaps.append(case.gap)
                mark = f" [gap {len(gaps)}]"
            kept = (f" *[{', '.join(case.untouched)}: byte-identical after]*" if case.untouched
                    else "")
            rows.append(f"| {_cell(case.input)}{mark} | `{_cell(result.command)}` | "
                        f"{_cell(message)}{kept} | {result.returncode} |")
            verdict = "" if ok else " (a known gap)" if case.gap else " NOT AS EXPECTED"
            print(f"{case.id}: exit {result.returncode} in {result.seconds:.1f} s{verdict}",
                  file=sys.stderr)
    print("| input | command | message (first line) | exit |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    for i, gap in enumerate(gaps, 1):
        print(f"\n[gap {i}] {gap}.")
    print(f"\n{len(CASES)} cases in {time.perf_counter() - started:.0f} s"
          f"{'; NOT AS EXPECTED: ' + ', '.join(failed) if failed else ''}.")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
