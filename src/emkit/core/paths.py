"""Where emkit keeps its caches (converted models, fetched datasets)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """Return (and create) the cache folder for `kind`, under $EMKIT_CACHE or ~/.cache/emkit."""
    root = os.environ.get("EMKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "emkit"
    )
    path = Path(root) / kind
    path.mkdir(parents=True, exist_ok=True)
    return path
