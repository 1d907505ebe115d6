"""Real-text corpora from Debian's dictd dictionaries, shared by the dictionary benchmarks.

WordNet 3.0 (`dict-wn`) and GCIDE (`dict-gcide`: Webster's 1913 and later additions) are read
offline from /usr/share/dictd (`apt-get install -y dict-gcide dict-wn`). Both define many of the
same words in different words, which is what the benchmarks lean on (SPEC 1c).
"""
from __future__ import annotations

import gzip
import hashlib
import re
import sys
from pathlib import Path

DICTD = Path("/usr/share/dictd")
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def read_dictd(name: str) -> list[tuple[str, str]]:
    """(headword, entry text) of a dictd database, one per distinct entry, in file order."""
    path = DICTD / f"{name}.dict.dz"
    if not path.exists():
        sys.exit(f"{path} is missing: apt-get install -y dict-gcide dict-wn")
    raw = gzip.open(path).read()
    entries: dict[int, tuple[str, int]] = {}
    index = (DICTD / f"{name}.index").read_text(encoding="utf-8", errors="replace")
    for line in index.splitlines():
        parts = line.split("\t")
        # "00-database-..." lines describe the database itself, not a word.
        if len(parts) >= 3 and not parts[0].startswith("00"):
            offset, length = (_b64(x) for x in parts[1:3])
            entries.setdefault(offset, (parts[0], length))
    return [(head, unindent(raw[o:o + n].decode("utf-8", "replace")))
            for o, (head, n) in sorted(entries.items())]


def unindent(text: str) -> str:
    """Indentation is layout, not text: lines lose their indent, runs of spaces become one."""
    return re.sub(r" {2,}", " ", re.sub(r"\n +", "\n", text)).strip()


def _b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + B64.index(c)
    return n


def bucket(text: str, seed: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, text): splits that do not depend on file order
    or on Python's hash seed."""
    return int(hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).hexdigest(), 16) / 2**64


def glosses(entry: str) -> set[str]:
    """Normalised gloss sentences of a WordNet entry, without synonym lists.

    WordNet repeats a synset's gloss under each of its words, so two entries sharing a gloss are
    the same text for a held-out test: whatever holds one out must drop the other.
    """
    body = " ".join(entry.split("\n", 1)[-1].split())
    body = re.sub(r"\[(syn|ant|also):[^\]]*\]", " ", body)
    return {g.strip(" ;") for g in re.split(r"(?:\b(?:n|v|adj|adv)\b)?\s*\d+:\s", body)
            if len(g.strip(" ;")) >= 20}


def quotes_wordnet(gcide_entry: str) -> bool:
    """GCIDE entries taken from WordNet 1.5 (marked "[WordNet 1.5]") repeat WordNet glosses."""
    return "WordNet" in gcide_entry


def headword(head: str) -> str:
    """The key that pairs the two dictionaries' entries for one word ("Dotal" ~ "dotal")."""
    return " ".join(head.lower().split())
