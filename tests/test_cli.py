"""The `phi3v` command line: info (with a checkpoint check) and tokens."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from model_helpers import tiny_model
from phi3v.cli import main


def test_info_on_an_official_config_name(capsys):
    assert main(["info", "phi-3.5-vision-instruct"]) == 0
    out = capsys.readouterr().out
    assert "4,146,621,440" in out and "32 layers" in out and "757 (num_crops 4)" in out


def test_tokens_gives_the_grid_and_count(capsys):
    assert main(["tokens", "1500", "1500", "--num-crops", "16"]) == 0
    assert "4x4 crops, 2509 tokens" in capsys.readouterr().out
    assert main(["tokens", "800", "600", "--num-crops", "16"]) == 0  # 3x4 crops (h x w): 1921 tokens
    assert "3x4 crops, 1921 tokens" in capsys.readouterr().out


def test_info_check_weights_passes_and_names_a_broken_key(tmp_path, capsys):
    tiny_model(seed=16).save_pretrained(tmp_path)
    assert main(["info", str(tmp_path), "--check-weights"]) == 0
    assert "check-weights    ok" in capsys.readouterr().out
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.0.mlp.gate_up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    assert main(["info", str(tmp_path), "--check-weights"]) == 1
    assert "missing keys: model.layers.0.mlp.gate_up_proj.weight" in capsys.readouterr().err


def test_unknown_model_is_a_clear_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nowhere")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_console_script_is_installed():
    script = shutil.which("phi3v", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.fail("the phi3v console script is not installed next to this Python (make install)")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "phi3v 0.1.0"
