"""Weights & Biases set-up shared by `phi3v train` and `phi3v evaluate`.

A run logs into its own output folder (``WANDB_DIR`` and the data, cache and config folders under ``OUT/wandb``) and
goes offline by itself when there is no API key (``WANDB_API_KEY`` or ``wandb login``), printing the ``wandb sync``
command that uploads it later. The environment is put back afterwards (`restore_env`), so the next run in the same
process (a notebook, a sweep, train then evaluate) gets its own folders.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

# The environment variables the set-up functions may set (put back by `restore_env`)
TRACKING_ENV = (
    "TENSORBOARD_LOGGING_DIR",
    "WANDB_PROJECT",
    "WANDB_LOG_MODEL",
    "WANDB_DIR",
    "WANDB_DATA_DIR",
    "WANDB_CACHE_DIR",
    "WANDB_CONFIG_DIR",
    "WANDB_MODE",
)


def snapshot_env() -> dict[str, str | None]:
    """The current values of `TRACKING_ENV`, for `restore_env`."""
    return {name: os.environ.get(name) for name in TRACKING_ENV}


def restore_env(previous: dict[str, str | None]) -> None:
    """Put the environment variables back as `snapshot_env` found them."""
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def wandb_logged_in() -> bool:
    """Whether ``wandb login`` stored a key (in the netrc file)."""
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text(encoding="utf-8")
    except OSError:
        return False


def setup_wandb_env(output_dir: str | Path, project: str) -> None:
    """Point W&B into ``output_dir`` (values already set by the user win) and go offline without an API key."""
    output_dir = Path(output_dir).resolve()
    os.environ.setdefault("WANDB_PROJECT", project)
    os.environ.setdefault("WANDB_DIR", str(output_dir))
    for name, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        os.environ.setdefault(name, str(output_dir / "wandb" / sub))
    if not os.environ.get("WANDB_API_KEY") and not wandb_logged_in():
        if os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
            logger.warning("W&B: no API key (WANDB_API_KEY or `wandb login`): logging offline into %s", output_dir)
        os.environ.setdefault("WANDB_MODE", "offline")


def finish_wandb() -> str | None:
    """Close the W&B run; return its folder when it ran offline (to ``wandb sync`` later)."""
    try:
        import wandb
    except ImportError:
        return None
    if wandb.run is None:
        return None
    offline = bool(getattr(wandb.run.settings, "_offline", False)) or os.environ.get("WANDB_MODE") == "offline"
    run_dir = str(Path(wandb.run.dir).parent)
    wandb.finish()
    wandb.teardown()  # wandb reads WANDB_* once per session: the next run in this process must start a new one
    return run_dir if offline else None
