"""The package's cache root: generated cohorts, preprocessed volumes, compiled kernels.

``data.cache_dir`` if a config sets it, else ``$MLSSP_JAX_CACHE``, else ``~/.cache/mlssp_jax``.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_VAR = "MLSSP_JAX_CACHE"


def cache_root(data_cfg=None) -> Path:
    """Cache folder: ``data_cfg.cache_dir``, else ``$MLSSP_JAX_CACHE``, else ~/.cache/mlssp_jax."""
    configured = getattr(data_cfg, "cache_dir", "") if data_cfg is not None else ""
    root = configured or os.environ.get(CACHE_VAR) or Path.home() / ".cache" / "mlssp_jax"
    return Path(root).expanduser()
