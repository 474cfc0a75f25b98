"""Progress of the long commands: a bar on a terminal, periodic log lines anywhere else, nothing with ``--quiet``.

A tqdm bar redraws itself many times a second; written to a log file or a CI job's output each redraw becomes a line
(or a run of carriage returns), thousands of them. So the bar is drawn only when standard error, where it goes, is a
terminal; otherwise progress is a log line (logger ``phi3v.progress``, INFO) at most every
`PROGRESS_INTERVAL_SECONDS` (``PHI3V_PROGRESS_INTERVAL`` overrides it; 0 logs every update), plus one when done:

    fetching images: 1200/3000 (40%), 85.3 img/s, ETA 0:00:21, failed 3
    train: step 40/120 (33%), loss 2.3124, 6.1 images/s, ETA 0:02:11

Used by `phi3v prepare` (`Progress`), `phi3v evaluate` / `phi3v predict` (through `phi3v.generation`) and
`phi3v train` (`attach_to_trainer`: the Trainer's own bar, or `TrainProgressLog`). This module imports no stage module.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any, Literal

logger = logging.getLogger("phi3v.progress")

PROGRESS_INTERVAL_SECONDS = 30.0
INTERVAL_ENV = "PHI3V_PROGRESS_INTERVAL"

Mode = Literal["bar", "log", "off"]


def progress_interval() -> float:
    """Seconds between two progress log lines: ``PHI3V_PROGRESS_INTERVAL`` when set, else 30."""
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None or raw.strip() == "":
        return PROGRESS_INTERVAL_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{INTERVAL_ENV} must be a number of seconds >= 0, got {raw!r}")
    return value


def progress_mode(enabled: bool = True, stream: Any = None) -> Mode:
    """How to show progress: ``off`` when not ``enabled`` (``--quiet``), ``bar`` when ``stream`` (default: standard
    error, where tqdm draws) is a terminal or a Jupyter kernel's output (tqdm draws a widget there), else ``log``."""
    if not enabled:
        return "off"
    stream = sys.stderr if stream is None else stream
    if type(stream).__module__.startswith("ipykernel"):
        return "bar"
    try:
        return "bar" if stream.isatty() else "log"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "log"


def format_seconds(seconds: float) -> str:
    """``H:MM:SS`` (``?`` when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


class Progress:
    """Progress over ``total`` items: a tqdm bar, periodic log lines or nothing (`progress_mode`).

    Example::

        with Progress(len(todo), "fetching images", unit="img", enabled=not quiet) as progress:
            for item in todo:
                ...
                progress.update(1)
                progress.set_postfix(failed=failures)

    Args:
        total: Items to do.
        label: What is being done ("fetching images").
        unit: Name of an item, for the rate ("img").
        enabled: False: nothing is shown (``--quiet``).
        mode: Force a mode instead of choosing one from standard error.
    """

    def __init__(
        self, total: int, label: str, *, unit: str = "it", enabled: bool = True, mode: Mode | None = None
    ) -> None:
        self.total = total
        self.label = label
        self.unit = unit
        self.mode: Mode = mode or progress_mode(enabled)
        if total <= 0:
            self.mode = "off"
        self.done = 0
        self.postfix: dict[str, Any] = {}
        self.interval = progress_interval() if self.mode == "log" else 0.0
        self.started = time.monotonic()
        self._last_line = self.started
        self._bar = None
        self._closed = False
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit=unit, desc=label)

    def update(self, n: int = 1) -> None:
        """``n`` more items done."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "log" and self.done < self.total:
            now = time.monotonic()
            if now - self._last_line >= self.interval:
                self._last_line = now
                logger.info("%s", self.line())

    def set_postfix(self, **fields: Any) -> None:
        """Extra counts shown after the rate (``failed=3``)."""
        self.postfix.update(fields)
        if self._bar is not None:
            self._bar.set_postfix(self.postfix, refresh=False)

    def line(self) -> str:
        """The progress line as logged: done/total, percentage, rate, ETA, extra counts."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        text = f"{self.label}: {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.0f}%), "
        text += f"{rate:.3g} {self.unit}/s, "
        if self.done >= self.total:
            text += f"done in {format_seconds(elapsed)}"
        else:
            text += f"ETA {format_seconds((self.total - self.done) / rate if rate > 0 else math.inf)}"
        return text + "".join(f", {key} {value}" for key, value in self.postfix.items())

    def close(self) -> None:
        """Finish: close the bar, or log the final line."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "log":
            logger.info("%s", self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach_to_trainer(trainer: Any, enabled: bool = True) -> Mode:
    """Set how a `transformers.Trainer` shows progress (call after building it, before ``train``).

    ``bar``: the Trainer's own tqdm bar, left as it is (``disable_tqdm`` still turns it off). ``log``: the bar and the
    Trainer's printed log dictionaries are replaced by `TrainProgressLog` lines. ``off``: neither (``--quiet``);
    warnings and errors still show, and every logged value still reaches log_history.jsonl and the trackers.

    Returns:
        The mode used.
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    mode = progress_mode(enabled)
    if mode == "bar":
        return mode
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    for callback in list(trainer.callback_handler.callbacks):  # a notebook's bar
        if type(callback).__name__ == "NotebookProgressCallback":
            trainer.remove_callback(callback)
    if mode == "log":
        trainer.add_callback(make_train_progress_log())
    return mode


def make_train_progress_log(interval: float | None = None) -> Any:
    """A `TrainProgressLog` callback (built here so that importing this module does not import transformers)."""
    from transformers import TrainerCallback

    class TrainProgressLog(TrainerCallback):
        """Periodic training lines: step/max steps, the last logged loss and ``images_per_second``, ETA; a line per
        evaluation with its loss and generation-check scores; a final line. Main process only."""

        def __init__(self) -> None:
            self.interval = progress_interval() if interval is None else interval
            self.loss: float | None = None
            self.images_per_second: float | None = None
            self.started = time.monotonic()
            self.first_step = 0
            self._last_line = -math.inf

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.monotonic()
            self.first_step = state.global_step  # a resumed run's rate counts only this process's steps
            if state.is_world_process_zero:
                logger.info("train: %d steps to go of %d", state.max_steps - state.global_step, state.max_steps)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            logs = logs or {}
            if not state.is_world_process_zero:
                return
            evaluated = {k: logs[k] for k in _EVAL_SHOWN if k in logs}
            if evaluated:
                shown = ", ".join(f"{k.removeprefix('eval_')} {_number(v)}" for k, v in evaluated.items())
                logger.info("train: evaluation at step %d: %s", state.global_step, shown)
            if "loss" in logs:
                self.loss = logs["loss"]
                self.images_per_second = logs.get("images_per_second", self.images_per_second)
                self._maybe_line(state)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero and not control.should_log:  # else on_log, with this step's loss
                self._maybe_line(state)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                logger.info("%s", self.line(state.global_step, state.max_steps, time.monotonic(), final=True))

        def _maybe_line(self, state: Any) -> None:
            now = time.monotonic()
            if now - self._last_line >= self.interval and state.global_step < state.max_steps:
                self._last_line = now
                logger.info("%s", self.line(state.global_step, state.max_steps, now))

        def line(self, step: int, max_steps: int, now: float, final: bool = False) -> str:
            elapsed = max(now - self.started, 1e-9)
            rate = (step - self.first_step) / elapsed
            parts = [f"train: step {step}/{max_steps} ({100 * step / max(max_steps, 1):.0f}%)"]
            if self.loss is not None:
                parts.append(f"loss {self.loss:.4f}")
            if self.images_per_second is not None:
                parts.append(f"{self.images_per_second:.3g} images/s")
            if final:
                parts.append(f"done in {format_seconds(elapsed)}")
            else:
                parts.append(f"ETA {format_seconds((max_steps - step) / rate if rate > 0 else math.inf)}")
            return ", ".join(parts)

    return TrainProgressLog()


# the evaluation values a line shows (all of them are in log_history.jsonl and the trackers)
_EVAL_SHOWN = (
    "eval_loss",
    "eval_gen_parse_rate",
    "eval_gen_price_ape_median",
    "eval_gen_category_accuracy",
    "eval_gen_title_similarity",
)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
