"""Write a file so readers never see half of it: into a temp file beside it, then one rename over it.

Used for every result file the project writes outside the model artifact (metrics.json, summary.json, results.csv,
plots, bench JSON and RESULTS.md); the artifact directory itself is swapped whole by ncf_ray/artifact.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path` to write; on success rename it over `path`, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, obj: Any) -> None:
    """JSON with sorted keys and indent 2, written atomically."""
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
