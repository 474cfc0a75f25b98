"""A run folder without a final model (an interrupted `phi3v train`): evaluate / predict / export / serve use its
latest complete checkpoint and say so; a partial checkpoint is never used; ambiguous folders are refused, naming what
they hold.

The interrupted run is real: a tiny LoRA run stopped by a callback right after its second checkpoint was written.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import httpx
import pytest
import yaml
from transformers import TrainerCallback

from phi3v.cli import main
from phi3v.runs import COMPLETE_MARKER, RunFolderError, complete_checkpoints, resolve_model_folder_of_run
from phi3v.serve import ServeOptions, ServerThread
from train_helpers import tiny_config_args


class _InterruptedError(RuntimeError):
    pass


class _StopAfterSave(TrainerCallback):
    """Stops the run (as a crash would) once the checkpoint of step ``step`` is complete."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise _InterruptedError(f"stopped after the checkpoint of step {state.global_step}")


@pytest.fixture(scope="module")
def interrupted_run(tiny_model_dir, tiny_dataset_dir, tmp_path_factory) -> Path:
    """checkpoint-1 and checkpoint-2 complete, no final model; then a partial checkpoint-3 (a crash mid-save: a
    copy of checkpoint-2 without the completion marker)."""
    from phi3v.train import load_train_config, train

    run = tmp_path_factory.mktemp("interrupted") / "run"
    settings = {"max_steps": 4, "eval_strategy": "no", "save_strategy": "steps", "save_steps": 1, "eval_samples": 0}
    config = load_train_config(None, tiny_config_args(tiny_model_dir, tiny_dataset_dir, run, **settings))
    with pytest.raises(_InterruptedError):
        train(config, callbacks=[_StopAfterSave(2)])
    assert not (run / "adapter_config.json").exists() and (run / "train_config.yaml").is_file()
    assert [p.name for p in complete_checkpoints(run)] == ["checkpoint-1", "checkpoint-2"]
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-3")
    (run / "checkpoint-3" / COMPLETE_MARKER).unlink()
    return run


def _uses_checkpoint_2(caplog, run: Path) -> None:
    lines = [r.getMessage() for r in caplog.records if r.name == "phi3v.runs"]
    assert any(f"using its latest complete checkpoint {run / 'checkpoint-2'}" in line for line in lines), lines
    assert any("partial (no phi3v_checkpoint.json, never used): checkpoint-3" in line for line in lines), lines


def test_evaluate_on_an_interrupted_run_uses_its_latest_complete_checkpoint(
    interrupted_run, tiny_dataset_dir, tmp_path, caplog, capsys
):
    caplog.set_level(logging.INFO)
    out = tmp_path / "eval"
    args = ["--data", str(tiny_dataset_dir), "--out", str(out), "--limit", "2", "--max-new-tokens", "4"]
    assert main(["evaluate", "--model", str(interrupted_run), *args, "--no-ablation", "--quiet"]) == 0
    _uses_checkpoint_2(caplog, interrupted_run)
    results = json.loads((out / "metrics.json").read_text())
    assert results["model"] == str(interrupted_run / "checkpoint-2") and results["model_kind"] == "adapter"
    assert "scored 2 of 2 rows" in capsys.readouterr().out


def test_predict_and_export_on_an_interrupted_run(interrupted_run, tiny_dataset_dir, tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO)
    run = tmp_path / "run"
    shutil.copytree(interrupted_run, run)
    photo = sorted((tiny_dataset_dir.parent / "synth" / "images").glob("*.jpg"))[0]  # the catalog's photos
    answers = tmp_path / "answers.jsonl"
    assert main(["predict", "--model", str(run), str(photo), "--out", str(answers), "--quiet"]) == 0
    _uses_checkpoint_2(caplog, run)
    assert json.loads(answers.read_text().splitlines()[0])["input"] == str(photo)
    # the run's evaluation (of checkpoint-2) is the card's, as for a finished run
    args = ["--data", str(tiny_dataset_dir), "--out", str(run / "eval"), "--limit", "2", "--max-new-tokens", "4"]
    assert main(["evaluate", "--model", str(run), *args, "--no-ablation", "--quiet"]) == 0
    caplog.clear()
    capsys.readouterr()
    export = tmp_path / "export"
    assert main(["export", "--model", str(run), "--out", str(export)]) == 0
    _uses_checkpoint_2(caplog, run)
    assert f"model card metrics from {run / 'eval' / 'metrics.json'}" in capsys.readouterr().out
    assert json.loads((export / "export_info.json").read_text())["source"] == str(run / "checkpoint-2")
    assert "2 of 2 rows scored" in (export / "README.md").read_text()


def test_serve_on_an_interrupted_run(interrupted_run, caplog):
    caplog.set_level(logging.INFO)
    options = ServeOptions(model=str(interrupted_run), port=0, max_new_tokens=4, log_level="warning", access_log=False)
    with ServerThread(options) as running:
        health = httpx.get(f"{running.url}/healthz", timeout=60).json()
    assert health["ready"] is True and health["model"] == "run"
    _uses_checkpoint_2(caplog, interrupted_run)


def test_a_run_that_ends_on_its_best_checkpoint_is_ambiguous(interrupted_run, tmp_path):
    run = tmp_path / "best-run"
    shutil.copytree(interrupted_run, run)
    config = yaml.safe_load((run / "train_config.yaml").read_text())
    config["training"]["load_best_model_at_end"] = True
    (run / "train_config.yaml").write_text(yaml.safe_dump(config))
    state_file = run / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["best_model_checkpoint"] = str(interrupted_run / "checkpoint-1")  # as the Trainer records it
    state_file.write_text(json.dumps(state))
    with pytest.raises(RunFolderError, match=r"best checkpoint .*checkpoint-1, not the latest complete one, "):
        resolve_model_folder_of_run(str(run))
    # the same best without load_best_model_at_end: the run would have ended on its latest checkpoint
    config["training"]["load_best_model_at_end"] = False
    (run / "train_config.yaml").write_text(yaml.safe_dump(config))
    assert resolve_model_folder_of_run(str(run)) == str(run / "checkpoint-2")


def test_folders_that_stand_for_no_single_model_are_refused_naming_what_they_hold(
    interrupted_run, tiny_dataset_dir, tmp_path, capsys
):
    # only a partial checkpoint: never used
    partial = tmp_path / "partial-run"
    partial.mkdir()
    shutil.copytree(interrupted_run / "checkpoint-3", partial / "checkpoint-3")
    (partial / "train_config.yaml").write_text("model: m\n")
    with pytest.raises(RunFolderError, match=r"no complete checkpoint.*partial .*: checkpoint-3"):
        resolve_model_folder_of_run(str(partial))
    # a folder of runs: which one is meant is the user's choice
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(interrupted_run, runs / "a")
    shutil.copytree(interrupted_run / "checkpoint-2", runs / "b")
    assert main(["evaluate", "--model", str(runs), "--data", str(tiny_dataset_dir), "--out", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err
    assert f"holds 2 model or run folder(s): {runs / 'a'}, {runs / 'b'}. Pass one of them as --model" in err
    # model folders, hub ids and empty folders go through unchanged (the loader gives its own message)
    assert resolve_model_folder_of_run(str(interrupted_run / "checkpoint-1")) == str(interrupted_run / "checkpoint-1")
    assert resolve_model_folder_of_run("microsoft/Phi-3.5-vision-instruct") == "microsoft/Phi-3.5-vision-instruct"
    (tmp_path / "empty").mkdir()
    assert resolve_model_folder_of_run(str(tmp_path / "empty")) == str(tmp_path / "empty")
