"""`stdout_aside()`: file descriptor 1 sent to stderr for a while, so a bench's stdout is its
table alone. Redirecting `sys.stdout` is not enough: DeepSpeed's logger holds the stdout it found
at import, and training and bank building print through it."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def stdout_aside() -> Iterator[None]:
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
