"""Progress of the long commands (`phi3v.progress`) and their CPU threads (`phi3v.threads`, ``--threads``).

The commands run for real as subprocesses whose output is a pipe (as under a CI job or ``> log``): progress must come
as log lines, never as bar redraws (carriage returns, cursor moves); on a pseudo-terminal the bar is drawn.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch

from phi3v.cli import main
from phi3v.progress import Progress, attach_to_trainer, format_seconds, progress_interval, progress_mode
from phi3v.threads import choose_threads, parse_thread_count, set_threads, usable_cores
from train_helpers import tiny_config_args

ROOT = Path(__file__).resolve().parents[1]
REDRAWS = re.compile(r"\r|\x1b\[|\d+it/s\]|\|\s*\d+/\d+ \[")  # carriage return, ANSI cursor move, tqdm's bar text


def _env(**extra: str) -> dict[str, str]:
    """The test's environment for a subprocess, without OMP_NUM_THREADS (the default thread count is under test)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _run(args: list[str], taskset: bool = False, **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "phi3v.cli", *args]
    if taskset:
        command = [shutil.which("taskset"), "-c", "0", *command]
    return subprocess.run(command, env=_env(**env), capture_output=True, text=True, timeout=600)


def _progress_lines(output: str) -> list[str]:
    return [line.split("phi3v.progress: ", 1)[1] for line in output.splitlines() if "phi3v.progress: " in line]


# ------------------------------------------------------------------------------------------------------- train
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux) to limit the CPU affinity")
def test_train_under_a_pipe_logs_progress_lines_and_one_thread_per_usable_core(
    tiny_model_dir, tiny_dataset_dir, tmp_path
):
    overrides = {"max_steps": 4, "logging_steps": 2, "eval_steps": 2, "save_steps": 100, "disable_tqdm": False}
    args = ["train", *tiny_config_args(tiny_model_dir, tiny_dataset_dir, tmp_path / "run", **overrides)]
    result = _run(args, taskset=True, PHI3V_PROGRESS_INTERVAL="0")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "using 1 CPU thread (of 1 core this process may use)" in output
    assert not REDRAWS.search(output), REDRAWS.search(output)
    assert "{'loss'" not in output, "the Trainer's printed log dictionaries are progress too"
    lines = _progress_lines(output)
    steps = [line for line in lines if line.startswith("train: step ")]
    assert [line.split(",")[0] for line in steps] == [f"train: step {k}/4 ({25 * k}%)" for k in (1, 2, 3, 4)], lines
    assert re.fullmatch(r"train: step 1/4 \(25%\), ETA \d+:\d\d:\d\d", steps[0]), steps[0]
    assert re.fullmatch(r"train: step 2/4 \(50%\), loss \d+\.\d{4}, [\d.]+ images/s, ETA \d+:\d\d:\d\d", steps[1])
    assert re.fullmatch(r"train: step 4/4 \(100%\), loss \d+\.\d{4}, [\d.]+ images/s, done in \d+:\d\d:\d\d", steps[3])
    evaluations = [line for line in lines if line.startswith("train: evaluation at step 2: ")]
    assert len(evaluations) == 1 and "loss " in evaluations[0] and "gen_parse_rate " in evaluations[0], lines

    # --quiet, on a fresh run: no progress at all, but warnings (here: more threads than usable cores) still show
    quiet_overrides = {"max_steps": 2, "eval_strategy": "no", "disable_tqdm": False}
    quiet_args = tiny_config_args(tiny_model_dir, tiny_dataset_dir, tmp_path / "quiet", **quiet_overrides)
    quiet = _run(["train", "--quiet", "--threads", "2", *quiet_args], taskset=True, PHI3V_PROGRESS_INTERVAL="0")
    output = quiet.stdout + quiet.stderr
    assert quiet.returncode == 0 and "trained lora: 2 steps" in output, output[-3000:]
    assert "using 2 CPU threads (of 1 core this process may use, from --threads)" in output
    assert "WARNING phi3v.threads: 2 CPU threads for 1 usable cores" in output
    assert not _progress_lines(output) and not REDRAWS.search(output) and "{'loss'" not in output


# ---------------------------------------------------------------------------------------------------- prepare, predict
def test_prepare_and_predict_under_a_pipe_log_progress_lines(tiny_model_dir, tmp_path):
    from phi3v.data.synthetic import make_synthetic_catalog

    catalog = make_synthetic_catalog(tmp_path / "synth", 6, seed=1, image_size=128, quirks=False)
    prepared = _run(["prepare", str(catalog), "--out", str(tmp_path / "prepared")], PHI3V_PROGRESS_INTERVAL="0")
    output = prepared.stdout + prepared.stderr
    assert prepared.returncode == 0, output[-3000:]
    lines = _progress_lines(output)
    assert [line.split(" (")[0] for line in lines] == [f"fetching images: {k}/6" for k in range(1, 7)], lines
    assert re.search(r"img/s, ETA \d+:\d\d:\d\d$", lines[0]) and re.search(r"img/s, done in [\d:]+$", lines[-1])
    assert not REDRAWS.search(output)

    images = sorted((tmp_path / "synth" / "images").glob("*.jpg"))[:3]
    out = tmp_path / "predictions.jsonl"
    args = ["predict", "--model", str(tiny_model_dir), *map(str, images), "--out", str(out), "--batch-size", "1"]
    predicted = _run([*args, "--max-new-tokens", "2", "--threads", "1"], PHI3V_PROGRESS_INTERVAL="0")
    output = predicted.stdout + predicted.stderr
    assert predicted.returncode == 0, output[-3000:]
    assert f"using 1 CPU thread (of {usable_cores()} core" in output
    lines = _progress_lines(output)
    assert [line.split(" (")[0] for line in lines] == [f"predicting: {k}/3" for k in (1, 2, 3)], lines
    assert "done in" in lines[-1]
    assert not REDRAWS.search(output)

    quiet = _run([*args, "--max-new-tokens", "2", "--quiet"], PHI3V_PROGRESS_INTERVAL="0")
    assert quiet.returncode == 0 and not _progress_lines(quiet.stderr), quiet.stderr[-3000:]
    assert "predicted 3 inputs" in quiet.stdout


# ------------------------------------------------------------------------------------------------------- the switch
def test_a_terminal_gets_the_bar_and_a_pipe_gets_lines(tmp_path):
    script = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s')\n"
        "from phi3v.progress import Progress\n"
        "with Progress(5, 'counting', unit='x') as progress:\n"
        "    for _ in range(5):\n"
        "        progress.update(1)\n"
        "print('mode', progress.mode, file=sys.stderr)\n"
    )
    main_fd, child_fd = pty.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns (0: tqdm draws nothing)
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=child_fd, stderr=child_fd, env=_env(PHI3V_PROGRESS_INTERVAL="0")
    )
    os.close(child_fd)
    chunks = []
    while True:
        try:
            chunk = os.read(main_fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main_fd)
    assert child.wait(timeout=60) == 0
    on_terminal = b"".join(chunks).decode()
    assert "mode bar" in on_terminal and "\r" in on_terminal and "5/5" in on_terminal, on_terminal
    assert "phi3v.progress:" not in on_terminal

    piped = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=_env(PHI3V_PROGRESS_INTERVAL="0")
    )
    assert "mode log" in piped.stderr and not REDRAWS.search(piped.stderr), piped.stderr
    assert len(_progress_lines(piped.stderr)) == 5


def test_progress_lines_interval_postfix_and_modes(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="phi3v.progress")
    monkeypatch.setenv("PHI3V_PROGRESS_INTERVAL", "0")
    with Progress(4, "fetching images", unit="img", mode="log") as progress:
        progress.update(1)
        progress.set_postfix(failed=1)
        progress.update(3)
    lines = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(r"fetching images: 1/4 \(25%\), [\d.e+]+ img/s, ETA \d+:\d\d:\d\d", lines[0]), lines
    assert re.fullmatch(r"fetching images: 4/4 \(100%\), [\d.e+]+ img/s, done in [\d:]+, failed 1", lines[1]), lines
    assert len(lines) == 2  # the last update is the final line, logged once on close

    caplog.clear()
    monkeypatch.setenv("PHI3V_PROGRESS_INTERVAL", "3600")  # an hour between lines: only the final one
    with Progress(50, "predicting", mode="log") as progress:
        for _ in range(50):
            progress.update(1)
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["predicting: 50/50 (100%)"]

    caplog.clear()
    with Progress(3, "quiet", enabled=False) as progress:
        progress.update(3)
    assert progress.mode == "off" and not caplog.records
    assert Progress(0, "nothing to do").mode == "off"
    assert progress_mode(False) == "off"

    monkeypatch.setenv("PHI3V_PROGRESS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="PHI3V_PROGRESS_INTERVAL must be a number of seconds >= 0, got 'soon'"):
        progress_interval()
    monkeypatch.delenv("PHI3V_PROGRESS_INTERVAL")
    assert progress_interval() == 30.0
    assert format_seconds(3725) == "1:02:05" and format_seconds(float("inf")) == "?"


def test_attach_to_trainer_swaps_the_bar_for_lines(tmp_path):
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    model = torch.nn.Linear(2, 2)
    for enabled, expected in ((True, "TrainProgressLog"), (False, None)):
        trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none"))
        assert attach_to_trainer(trainer, enabled) == ("log" if enabled else "off")  # pytest's stderr: no terminal
        names = [type(callback).__name__ for callback in trainer.callback_handler.callbacks]
        assert ProgressCallback.__name__ not in names and PrinterCallback.__name__ not in names
        assert (expected in names) if expected else not any("Progress" in name for name in names), names


# ------------------------------------------------------------------------------------------------------- threads
def test_thread_counts_and_their_errors(monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert choose_threads(None) == (len(os.sched_getaffinity(0)), "the default") and usable_cores() >= 1
    assert choose_threads(3) == (3, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose_threads(None) == (1, "OMP_NUM_THREADS")
    assert choose_threads(2) == (2, "--threads")  # the flag wins
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='many' is not a whole number >= 1"):
        choose_threads(None)
    for bad in ("0", "-2", "1.5", "all"):
        with pytest.raises(ValueError, match="--threads takes a whole number of CPU threads >= 1"):
            parse_thread_count(bad)
    assert main(["predict", "--model", "tiny", "x.jpg"]) == 1  # refused before anything loads
    assert "phi3v predict: OMP_NUM_THREADS='many'" in capsys.readouterr().err
    monkeypatch.delenv("OMP_NUM_THREADS")
    for command in (["train"], ["evaluate", "--model", "m", "--data", "d", "--out", "o"], ["serve", "--model", "m"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--threads", "0"])
        assert exit_info.value.code == 2
        assert "--threads takes a whole number of CPU threads >= 1, got 0" in capsys.readouterr().err

    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
