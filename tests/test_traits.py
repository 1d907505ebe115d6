import json
import re

from memory3.data import train_tokenizer
from memory3.data.traits import TRAITS, VALUES, write_traits
from memory3.memory.overlap import EVAL_OVERLAP, overlap


def test_trait_words_are_each_traits_own():
    words = [w for v in VALUES.values() for w in v]
    assert len(TRAITS) == 32 and all(len(v) == 12 for v in VALUES.values())
    assert len(set(words)) == len(words) and not set(words) & set(TRAITS)


def test_groups_disjoint_and_bank_holds_train_and_heldout_only(tmp_path):
    paths = write_traits(tmp_path, n_warm=20, n_train=30, n_heldout=10, labelled=True)
    texts = {g: paths[g].read_text() for g in ("warm", "train", "heldout")}
    names = {g: set(re.findall(r"(\w+) has ", t)) for g, t in texts.items()}
    assert [len(names[g]) for g in ("warm", "train", "heldout")] == [20, 30, 10]
    assert not (names["warm"] & names["train"] or names["warm"] & names["heldout"]
                or names["train"] & names["heldout"])
    records = [json.loads(line) for line in paths["knowledge"].read_text().splitlines()]
    owners = {r["text"].rsplit(" of ", 1)[1] for r in records}
    assert owners == names["train"] | names["heldout"]
    assert len({r["id"] for r in records}) == len(records) == 40 * 4
    # Every value a held-out text states is in one of that person's records, after its trait.
    for doc in texts["heldout"].split("\n\n"):
        name = re.match(r"(\w+) has", doc).group(1)
        held = " ".join(r["text"] for r in records if r["text"].endswith(f" of {name}"))
        pairs = re.findall(r"(\w+) (\w+)", " ".join(s.split(" has ", 1)[1] for s in doc.split(".")
                                                    if " has " in s))
        assert len(pairs) == 32 and all(f"{t} {v}" in held and v in VALUES[t] for t, v in pairs)
    # The warmup text puts each person's records in front of their text.
    first = texts["warm"].split("\n\n")[0]
    assert first.index(" of ") < first.index(" has ")


def test_deterministic_and_records_pass_the_evaluation_overlap_filter(tmp_path):
    a = write_traits(tmp_path / "a", n_warm=100, n_train=300, n_heldout=10, labelled=True)
    b = write_traits(tmp_path / "b", n_warm=100, n_train=300, n_heldout=10, labelled=True)
    for key in a:
        assert a[key].read_bytes() == b[key].read_bytes()
    tok = train_tokenizer([a["warm"], a["train"]], tmp_path / "tok", 1024, progress=False)
    records = [json.loads(line)["text"] for line in a["knowledge"].read_text().splitlines()]
    for doc in a["heldout"].read_text().split("\n\n")[:5]:
        name = re.match(r"(\w+) has", doc).group(1)
        mine = [r for r in records if r.endswith(f" of {name}")]
        assert len(mine) == 4
        # A record lists the values the text states, but not as a copy of it (with a tokenizer
        # of a few hundred people; from a few dozen, pieces of single letters match anywhere).
        assert all(overlap(tok.encode(r), tok.encode(doc)) <= EVAL_OVERLAP for r in mine)


def test_intro_opens_every_text_before_the_warmup_records(tmp_path):
    paths = write_traits(tmp_path, n_warm=5, n_train=5, n_heldout=5, labelled=True,
                         intro="listed")
    for g in ("warm", "train", "heldout"):
        for doc in paths[g].read_text().strip().split("\n\n"):
            name = re.search(r"(\w+) has ", doc).group(1)
            assert doc.startswith(f"{name} is in the registry.")
            if g == "warm":  # intro, then the records, then the text
                assert doc.index(f" of {name}") < doc.index(f"{name} has")
