"""Bad input, tabled (issue 14 section 4): every case of tests/bad_input_cases.py run as the real
command in a fresh process, on real tokenizers, checkpoints and banks. Each must end with its exit
status, no traceback, a message naming the file or field at fault, and every output that existed
before it byte-identical. bench/bad_inputs.py prints the same cases as the table in
bench/RESULTS.md."""
from __future__ import annotations

import re

import pytest

from bad_input_cases import CASES, build_fixtures, run_case


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return build_fixtures(tmp_path_factory.mktemp("bad_inputs"))


def _param(case):
    marks = [pytest.mark.slow] if case.slow else []
    if case.gap:
        marks.append(pytest.mark.xfail(strict=True, reason=case.gap))
    return pytest.param(case, id=case.id, marks=marks)


def test_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case, root):
    result = run_case(case, root)
    shown = f"memory3 {' '.join(result.argv)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert result.returncode == case.exit, shown
    assert "Traceback" not in result.stderr, shown
    text = result.stdout if case.exit == 0 else result.stderr
    assert any(re.search(case.message, line) for line in text.splitlines()), shown
    assert not result.changed, f"changed by a refused command: {result.changed}\n{shown}"
    if case.check is not None:
        case.check(root, result)
