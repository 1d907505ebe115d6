"""`memory3 quickstart`, the README's front door: every stage runs, end to end, and a re-run
resumes rather than redoes (a few training steps; the measured numbers are in the README)."""
import json
import re

from memory3.cli import main
from memory3.data.traits import VALUES
from memory3.quickstart import _first_person, _pairs


def test_quickstart_runs_end_to_end_and_resumes(tmp_path, capsys):
    out = tmp_path / "qs"
    main(["quickstart", "--out", str(out), "--steps", "8", "--continual-steps", "4"])
    printed = capsys.readouterr().out
    assert [int(n) for n in re.findall(r"^== (\d)/8", printed, re.M)] == list(range(1, 9))
    results = json.loads((out / "eval.json").read_text())
    assert set(results) == {"none", "memory", "rag"}
    assert all(r["perplexity"] > 1 and r["tokens"] > 0 for r in results.values())
    assert re.search(r"chunk 0 \(after \d+ tokens\) read: .* of [A-Z][a-z]+", printed)
    assert re.search(r"memory \d+ of \d+, none \d+ of \d+", printed)
    stamp = (out / "warmup" / "checkpoints" / "latest").stat().st_mtime_ns
    main(["quickstart", "--out", str(out), "--steps", "8", "--continual-steps", "4"])
    assert (out / "warmup" / "checkpoints" / "latest").stat().st_mtime_ns == stamp


def test_generation_prompt_names_a_heldout_person_and_pairs_parse(tmp_path):
    from memory3.data.traits import write_traits
    paths = write_traits(tmp_path, n_warm=5, n_train=5, n_heldout=3, labelled=True)
    prompt, person = _first_person(paths["heldout"])
    truth, told = _pairs(person), _pairs(prompt)
    assert person.startswith(prompt) and prompt.endswith(" has")
    assert len(truth) == 32 and all(v in VALUES[t] for t, v in truth.items())
    assert list(told.items()) == list(truth.items())[:8]
