"""A persistent XLA compilation cache, so a second run compiles nothing the first compiled.

The command lines turn it on by default; library users call `enable_compilation_cache()`.
Where it lives: `--compilation_cache`, else $TRIATTENTION_COMPILATION_CACHE, else
$XDG_CACHE_HOME/triattention_jax/xla (~/.cache/...). The value "off" disables it.
"""

from __future__ import annotations

import os
from pathlib import Path

from triattention_jax.errors import UserError

ENV_VAR = "TRIATTENTION_COMPILATION_CACHE"
OFF = "off"


def default_location() -> str:
    """Where the cache goes when nothing says otherwise ("off" when the environment disables it)."""
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return str(base / "triattention_jax" / "xla")


def enable_compilation_cache(location: str | os.PathLike | None = None) -> Path | None:
    """Points jax's persistent compilation cache at `location` (default: `default_location()`)
    and caches every compiled function, however quick its compile; returns the folder, or None
    when the location is "off"."""
    import jax

    location = str(location) if location is not None else default_location()
    if location.strip().lower() == OFF:
        return None
    folder = Path(location).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create the compilation cache folder {folder} ({e.strerror}): pass --compilation_cache with "
            f"another folder, or {OFF}"
        ) from e
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
