"""Run folders of `phi3v train`: which checkpoints are complete, and which model a run folder stands for.

A run folder (``output_dir``) ends with the final model (an adapter or full weights) beside its ``checkpoint-N``
folders. A run that was interrupted has only the checkpoints, and the last of them may be partial: a checkpoint is
complete once its ``phi3v_checkpoint.json`` marker exists (`phi3v.train` writes it last, atomically).

`resolve_model_folder_of_run` is what ``--model`` of `phi3v evaluate` / `predict` / `export` / `serve` goes through:

- a model folder (``config.json`` or ``adapter_config.json``), a hub id, or anything that is not a folder: unchanged;
- a run folder without a final model: its latest complete checkpoint, with a log line naming it; partial checkpoints
  are never chosen;
- ambiguous folders raise `RunFolderError` naming what was found: a run that ended on its best checkpoint
  (``load_best_model_at_end``) whose best is not its latest one, a run with no complete checkpoint, a folder holding
  several model or run folders.

This module imports nothing of phi3v's, so every layer may use it (`phi3v.train` does for resuming).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "phi3v_checkpoint.json"  # written last: a checkpoint folder without it is partial
RUN_CONFIG_NAME = "train_config.yaml"
_MODEL_FILES = ("config.json", "adapter_config.json")


class RunFolderError(ValueError):
    """A ``--model`` folder that holds no model and no single checkpoint to stand for it; the message lists what
    the folder holds."""


def _checkpoint_folders(folder: Path) -> list[tuple[int, Path]]:
    found = []
    for path in folder.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX) :]
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found)


def complete_checkpoints(folder: str | Path) -> list[Path]:
    """The ``checkpoint-N`` folders of a run whose completion marker exists, oldest step first."""
    return [path for _, path in _checkpoint_folders(Path(folder)) if (path / COMPLETE_MARKER).is_file()]


def partial_checkpoints(folder: str | Path) -> list[Path]:
    """The ``checkpoint-N`` folders of a run without a completion marker (a crash while saving), oldest first."""
    return [path for _, path in _checkpoint_folders(Path(folder)) if not (path / COMPLETE_MARKER).is_file()]


def is_model_folder(folder: Path) -> bool:
    """A folder holding a model or an adapter (what `phi3v.inference.load_for_inference` loads as it is)."""
    return any((folder / name).is_file() for name in _MODEL_FILES)


def _best_checkpoint(run: Path, latest: Path) -> Path | None:
    """The best checkpoint the run recorded (``best_model_checkpoint`` in the latest checkpoint's trainer state)
    when the run ends on its best model (``load_best_model_at_end``); None otherwise."""
    config_file = run / RUN_CONFIG_NAME
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None
    if not ((config or {}).get("training") or {}).get("load_best_model_at_end"):
        return None
    try:
        state = json.loads((latest / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    best = state.get("best_model_checkpoint") if isinstance(state, dict) else None
    return (run / Path(best).name) if best else None


def resolve_model_folder_of_run(model: str) -> str:
    """``model``, or the checkpoint that stands for it when it is a run folder without a final model.

    Args:
        model: A ``--model`` argument: a folder or a hub id.

    Returns:
        ``model`` unchanged when it is not a folder or holds a model; else the path of the run's latest complete
        checkpoint (logged as a warning naming it).

    Raises:
        RunFolderError: The folder holds checkpoints but none is complete; the run ended on its best checkpoint
            and that is not the latest one; or it holds no checkpoint but several (or one) model or run folders.
    """
    folder = Path(model)
    if not folder.is_dir() or is_model_folder(folder):
        return model
    complete = complete_checkpoints(folder)
    partial = partial_checkpoints(folder)
    partial_text = (
        f"; partial (no {COMPLETE_MARKER}, never used): {', '.join(p.name for p in partial)}" if partial else ""
    )
    if complete:
        latest = complete[-1]
        best = _best_checkpoint(folder, latest)
        if best is not None and best.resolve() != latest.resolve() and best.is_dir():
            raise RunFolderError(
                f"{model} holds no final model, and the run ends on its best checkpoint (load_best_model_at_end), "
                f"which is {best.name}, not the latest complete one, {latest.name}. Complete checkpoints: "
                f"{', '.join(p.name for p in complete)}{partial_text}. Pass the one you mean: --model {best} or "
                f"--model {latest}"
            )
        logger.warning(
            "%s holds no final model (an interrupted run?): using its latest complete checkpoint %s (complete: %s%s)",
            model,
            latest,
            ", ".join(p.name for p in complete),
            partial_text,
        )
        return str(latest)
    if partial:
        raise RunFolderError(
            f"{model} holds no final model and no complete checkpoint: the run stopped before one was fully "
            f"written{partial_text}. Train again (phi3v train without --resume, in a new output_dir)"
        )
    inside = sorted(
        path
        for path in folder.iterdir()
        if path.is_dir() and (is_model_folder(path) or complete_checkpoints(path) or (path / RUN_CONFIG_NAME).is_file())
    )
    if inside:
        raise RunFolderError(
            f"{model} is not a model folder but holds {len(inside)} model or run folder(s): "
            f"{', '.join(str(path) for path in inside)}. Pass one of them as --model"
        )
    return model
