"""The README's Python example runs as written, against a tiny model saved in the official layout."""

from __future__ import annotations

import re
from pathlib import Path

from model_helpers import tiny_model
from phi3v import Phi3VImageProcessor, Phi3VProcessor

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_model_example_runs(tmp_path, monkeypatch, tiny_tokenizer, make_image, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "README lost its Python example"
    example = blocks[0]
    folder = tmp_path / "model"
    tiny_model(seed=12).save_pretrained(folder)
    Phi3VProcessor(Phi3VImageProcessor(num_crops=16), tiny_tokenizer).save_pretrained(folder)
    make_image(900, 600).save(tmp_path / "shirt.jpg")
    monkeypatch.chdir(tmp_path)
    # The only substitutions: a local folder for the hub id, the CPU for CUDA.
    assert '"microsoft/Phi-3.5-vision-instruct"' in example and '"cuda"' in example
    code = example.replace('"microsoft/Phi-3.5-vision-instruct"', repr(str(folder))).replace('"cuda"', '"cpu"')
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["processor"].image_processor.num_crops == 4  # the example's num_crops override took effect
    assert namespace["out"].shape[1] > namespace["inputs"]["input_ids"].shape[1]  # it generated
    assert capsys.readouterr().out.strip()  # and printed the decoded answer


def test_readme_offline_prepare_commands_run(tmp_path, monkeypatch, capsys):
    """The README's offline catalog example (`phi3v synth ... && phi3v prepare ...`) runs as written."""
    import shlex

    from phi3v.cli import main

    line = next(line for line in README.read_text().splitlines() if line.startswith("phi3v synth "))
    commands = [shlex.split(part) for part in line.split("&&")]
    assert [c[:2] for c in commands] == [["phi3v", "synth"], ["phi3v", "prepare"]]
    monkeypatch.chdir(tmp_path)
    for command in commands:
        assert main([*command[1:], *(["--quiet"] if command[1] == "prepare" else [])]) == 0
    assert "rows in = kept + failed + duplicates: 200 =" in capsys.readouterr().out
    assert (tmp_path / "data" / "sample-prepared" / "dataset" / "dataset_dict.json").is_file()


def test_readme_offline_training_commands_run(tmp_path, monkeypatch, tiny_dataset_dir, capsys):
    """The README's offline training and evaluation lines (`phi3v init-model`, `phi3v train --config
    configs/tiny.yaml`, `phi3v evaluate --model runs/tiny-lora ...`) run as written on a prepared sample (a few
    steps: `--max_steps 4` is the only addition; `--quiet` for evaluate)."""
    import shlex
    import shutil

    from phi3v.cli import main

    lines = README.read_text().splitlines()
    init = shlex.split(next(line for line in lines if line.startswith("phi3v init-model ")).split("#")[0])
    train = shlex.split(next(line for line in lines if line.startswith("phi3v train --config configs/tiny")))
    evaluate = shlex.split(next(line for line in lines if line.startswith("phi3v evaluate --model runs/tiny")))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(README.parent / "configs", tmp_path / "configs")
    shutil.copytree(tiny_dataset_dir, tmp_path / "data" / "sample-prepared")  # what the prepare line writes
    assert main(init[1:]) == 0
    assert main([*train[1:], "--max_steps", "4", "--eval_steps", "4", "--save_steps", "4"]) == 0
    assert "trained lora: 4 steps" in capsys.readouterr().out
    assert (tmp_path / "runs" / "tiny-lora" / "adapter_model.safetensors").is_file()
    assert main([*evaluate[1:], "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "rows of 'test'" in out and "report.html" in out
    assert (tmp_path / "runs" / "tiny-lora" / "eval" / "report.html").is_file()
