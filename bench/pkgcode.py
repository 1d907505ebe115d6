"""Real code with its own repository as the knowledge base: the installed packages' source.

Repository-level completion, the setting code models meet every day: a held-out file of a package
is predicted while the bank holds the package's other files, whose names, signatures and idioms
the file uses. Packages are split as `bench/copy_emergence.py` and the `cpu-warmup` model's
training text split them (every 8th site-packages package, sorted by name, held out), so a
held-out package is nowhere in warmup training. Nothing is imported: files are read and cut with
`ast` (bench/pycode.py).
"""
from __future__ import annotations

import site
from pathlib import Path

from dictionaries import bucket
from pycode import file_documents

SITE = Path(site.getsitepackages()[0])
MAX_FILE_CHARS = 200_000  # a few generated giants (tables, vendored blobs) would dominate


def packages(held_out: bool, root: Path = SITE) -> list[Path]:
    """The held-out (every 8th, by name) or the training packages of root."""
    every = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.endswith("-info"))
    return [p for i, p in enumerate(every) if (i % 8 == 0) == held_out]


def python_files(root: Path, held_out: bool) -> list[Path]:
    """Every .py file of the held-out (or of the training) packages."""
    return sorted(f for p in packages(held_out, root) for f in p.rglob("*.py")
                  if f.stat().st_size < MAX_FILE_CHARS)


def _documents(files: list[Path], package: str) -> list[dict]:
    return [{"text": t, "head": package, "file": str(f.relative_to(SITE))}
            for f in files for t in file_documents(f)]


def _sample(held_out: bool, budget_chars: int, per_package_chars: int, seed: str):
    """(package name, its files) of packages taken in hash order until budget_chars, each
    package's files in hash order up to per_package_chars (so that no giant dominates)."""
    chosen = sorted(packages(held_out), key=lambda p: bucket(p.name, f"{seed}-packages"))
    total = 0
    for pkg in chosen:
        files = sorted((f for f in pkg.rglob("*.py") if 500 < f.stat().st_size < MAX_FILE_CHARS),
                       key=lambda f: bucket(str(f.relative_to(SITE)), f"{seed}-files"))
        kept, size = [], 0
        for f in files:
            if size >= per_package_chars:
                break
            kept.append(f)
            size += f.stat().st_size
        if len(kept) < 5:  # nothing to retrieve from in a package of a file or two
            continue
        yield pkg.name, kept
        total += size
        if total >= budget_chars:
            return


def rows(train_chars: int, heldout_package_chars: int, heldout_fraction: float,
         tune_fraction: float, per_package_chars: int = 1_000_000,
         bank_files: float = 0.0) -> tuple[dict, dict]:
    """train: files of training packages (the continual phase's text). heldout / tune: files of
    held-out packages, split by a hash of the file; kb: those packages' other files, plus the
    training packages' files.

    bank_files = 0: every training file is both training text and in the knowledge base (a
    training chunk's bank holds the rest of its own file). bank_files = F: that fraction of each
    training package's files (by a hash of the file) goes to the knowledge base only, the rest to
    the training text only, so that training reads what evaluation reads: other files of the
    package, never the file being predicted (train_chars then counts both)."""
    seed = "memory-pkgcode"
    out: dict[str, list[dict]] = {"train": [], "kb": [], "tune": [], "heldout": []}
    for name, files in _sample(False, train_chars, per_package_chars, seed):
        for f in files:
            in_bank = bucket(str(f.relative_to(SITE)), f"{seed}-bank") < bank_files
            docs = _documents([f], name)
            if not bank_files or not in_bank:
                out["train"] += docs
            if not bank_files or in_bank:
                out["kb"] += docs
    heldout_packages = 0
    for name, files in _sample(True, heldout_package_chars, per_package_chars, seed):
        heldout_packages += 1
        for f in files:
            u = bucket(str(f.relative_to(SITE)), f"{seed}-split")
            slice_ = ("heldout" if u < heldout_fraction else
                      "tune" if u < heldout_fraction + tune_fraction else "kb")
            out[slice_] += _documents([f], name)
    for name in ("kb", "tune", "heldout"):  # an evaluation's first sequences span many files
        out[name].sort(key=lambda d: bucket(d["text"], f"{seed}-order"))
    return out, {"train_packages": len({d["head"] for d in out["train"]}),
                 "heldout_packages": heldout_packages,
                 "heldout_files": len({d["file"] for d in out["heldout"]})}
