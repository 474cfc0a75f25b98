"""A tiny training setup shared by the training tests: a random tiny model folder and a prepared synth catalog.

The catalog's photos come in three shapes (square, wide, tall), so batches mix crop grids and token counts.
"""

from __future__ import annotations

from pathlib import Path


def build_tiny_model(folder: Path) -> Path:
    """`phi3v init-model` (tiny, seed 0) into ``folder``."""
    from phi3v.model.random_init import write_random_checkpoint

    return write_random_checkpoint(folder, "tiny", seed=0, num_crops=4)


def build_prepared_catalog(folder: Path, n: int = 48, seed: int = 0) -> Path:
    """A `phi3v synth` catalog of ``n`` products, photos made square / wide / tall (`reshape_photos`), prepared.

    Returns:
        `Path`: the prepared folder (``folder / "prepared"``).
    """
    from phi3v.data.synthetic import make_synthetic_catalog, reshape_photos
    from phi3v.prepare import PrepareOptions, prepare

    catalog = make_synthetic_catalog(folder / "synth", n, seed=seed, image_size=256, quirks=False)
    reshape_photos(catalog)
    report = prepare(str(catalog), folder / "prepared", PrepareOptions(progress=False))
    assert report.invariant_holds() and report.kept == n, report
    return folder / "prepared"


def tiny_config_args(model: Path, data: Path, out: Path, **overrides: object) -> list[str]:
    """Command-line style overrides for a short tiny run (apply to configs/tiny.yaml or to no file)."""
    base: dict[str, object] = {
        "model": str(model),
        "data": str(data),
        "output_dir": str(out),
        "eval_samples": 2,
        "eval_max_new_tokens": 8,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "dataloader_num_workers": 0,
        "logging_steps": 1,
        "report_to": "none",
        "disable_tqdm": True,
    }
    base.update(overrides)
    args: list[str] = []
    for key, value in base.items():
        args += [f"--{key}", value if isinstance(value, str) else repr(value).replace("'", '"')]
    return args


def logged_losses(out: Path) -> dict[int, float]:
    """Training loss per logged step, from a run's log_history.jsonl."""
    import json

    rows = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def kill_at_checkpoint(proc, out: Path, step: int, timeout_s: float = 120) -> None:
    """Wait until ``out/checkpoint-<step>`` is complete, then SIGKILL ``proc`` and every process under it (a launcher's
    ranks too: torch elastic starts its workers in sessions of their own, so a process-group kill would miss them).

    Fails the test, with the process's output, if it exits first or the checkpoint takes over ``timeout_s``.
    """
    import signal
    import time

    import psutil

    from phi3v.train import COMPLETE_MARKER

    deadline = time.monotonic() + timeout_s
    while not (out / f"checkpoint-{step}" / COMPLETE_MARKER).exists():
        assert proc.poll() is None, proc.communicate()[0][-5000:]
        assert time.monotonic() < deadline, f"no checkpoint-{step} within {timeout_s:.0f} s"
        time.sleep(0.05)
    parent = psutil.Process(proc.pid)
    family = [*parent.children(recursive=True), parent]
    for member in family:
        member.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=30)
    proc.wait()
