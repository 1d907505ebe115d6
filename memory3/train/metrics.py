"""Metrics as JSON lines: one object per event, readable by tools/plot_metrics.py."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends to `path` (on rank 0 only); a resumed run keeps appending to the same file."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._file = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)

    def log(self, **record: Any):
        if self._file is not None:
            record.setdefault("time", round(time.time(), 3))
            self._file.write(json.dumps(record) + "\n")

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records; where a resumed run logged a step again, the later record wins."""
    latest: dict[tuple, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            latest[(r.get("kind"), r.get("step"))] = r
    return sorted(latest.values(), key=lambda r: (r.get("step", 0), r.get("kind", "")))
