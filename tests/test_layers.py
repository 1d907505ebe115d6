"""Floors (SPEC section 4): lower modules never import higher ones.

Training code (memory3/train/) sits above the config, checkpoint reading, data, model, memory,
eval, hf and memdec: each reads checkpoints through memory3/checkpoints.py and validates recipes
through memory3/config.py without importing the trainer. Every import counts, including those
inside functions (they run as soon as the function does). The exceptions are the commands that
start training (cli.py, quickstart.py) and the Memory Decoder's training phase, which plugs into
the trainer.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import memory3

PACKAGE = Path(memory3.__file__).parent
ABOVE_TRAINING = {"cli.py", "quickstart.py", "__main__.py", "memdec/phase.py"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_nothing_below_training_imports_it():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        if name.startswith("train/") or name in ABOVE_TRAINING:
            continue
        found = sorted(m for m in imported_modules(path)
                       if m == "memory3.train" or m.startswith("memory3.train."))
        if found:
            offenders[name] = found
    assert not offenders, f"modules below memory3/train import it: {offenders}"
    assert (PACKAGE / "memory" / "build.py").exists()  # the walk saw the package


def test_config_and_checkpoint_reading_load_without_training_code():
    code = ("import sys, memory3.config, memory3.checkpoints; "
            "memory3.config.Recipe.from_name('tiny-continual'); "
            "print(sorted(m for m in sys.modules if m.startswith('memory3.train')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
