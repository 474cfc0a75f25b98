"""``mode: qlora`` for real on CPU (bitsandbytes NF4 ``Linear4bit``), on the tiny random model and the synth catalog.

One uninterrupted run and one run SIGKILLed mid-way (a real ``phi3v train`` process) then resumed; then `phi3v
evaluate` and `phi3v export` of the result, and the answer difference between the adapter on its NF4 base, the
export merged into the NF4 round trip of the base (the default) and a merge into the original base weights.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from phi3v.cli import main
from phi3v.inference import ModelLoadError, load_for_inference
from phi3v.model.modeling import Phi3VForCausalLM
from phi3v.model.processing import Phi3VProcessor
from phi3v.quantization import lm_linear_layers, nf4_linear, nf4_round_trip
from phi3v.train import (
    TrainingError,
    _preflight,
    _quantize_lm_4bit,
    latest_checkpoint,
    load_model_and_processor,
    load_train_config,
    parameter_counts,
    train,
)
from test_export import _answers, _logits, _test_images
from test_train import _train_process
from train_helpers import kill_at_checkpoint, logged_losses, tiny_config_args

bnb = pytest.importorskip("bitsandbytes", reason="mode qlora needs bitsandbytes: pip install 'phi3v[qlora]'")

STEPS = 8
KILL_AFTER = 4
SETTINGS = {
    "mode": "qlora",
    "max_steps": STEPS,
    "save_steps": 2,
    "eval_steps": 4,  # the generation check at step 4 runs eval-mode forwards between training steps
    "dataloader_num_workers": 1,
    "learning_rate": 1e-3,
    "use_cpu": True,  # the CPU path, also on a machine with a GPU
}


def _config(model: Path, data: Path, out: Path, **overrides: object):
    return load_train_config(None, tiny_config_args(model, data, out, **{**SETTINGS, **overrides}))


def _lm_4bit_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


class _Watch(TrainerCallback):
    """Records the trainable tensors at the start and, after every step, the state of the 4-bit layers."""

    def __init__(self) -> None:
        self.initial: dict[str, torch.Tensor] = {}
        self.steps: list[dict[str, object]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        layers = _lm_4bit_layers(model)
        self.steps.append(
            {
                "step": state.global_step,
                "layers": len(layers),
                "uint8": all(m.weight.dtype == torch.uint8 and not m.weight.requires_grad for m in layers),
                "packed_for_cpu": any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers),
                "plain_lm_linears": sum(  # full-precision linears left in the LM decoder, the adapters' own aside
                    type(m) is torch.nn.Linear and ".model.layers." in n and "lora_" not in n
                    for n, m in model.named_modules()
                ),
            }
        )


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tiny_dataset_dir, tmp_path_factory):
    """An uninterrupted qlora run, and the same run SIGKILLed after checkpoint-4 and resumed; both to step 8."""
    root = tmp_path_factory.mktemp("qlora")
    watch = _Watch()
    reference = train(_config(tiny_model_dir, tiny_dataset_dir, root / "reference"), callbacks=[watch])

    out = root / "killed"
    proc = _train_process(tiny_config_args(tiny_model_dir, tiny_dataset_dir, out, **SETTINGS))
    kill_at_checkpoint(proc, out, KILL_AFTER)
    killed_at = latest_checkpoint(out)
    assert not (out / "training_summary.json").exists(), "killed before the end"
    resumed = train(_config(tiny_model_dir, tiny_dataset_dir, out), resume=True)
    return {"root": root, "reference": reference, "watch": watch, "resumed": resumed, "killed_at": killed_at}


# ------------------------------------------------------------------------------------------------------- checks
def test_preflight_accepts_qlora_on_cpu_and_names_the_missing_bitsandbytes(
    tiny_model_dir, tiny_dataset_dir, tmp_path, monkeypatch
):
    config = _config(tiny_model_dir, tiny_dataset_dir, tmp_path / "run")
    _preflight(config, config.training_arguments())  # no GPU needed any more
    monkeypatch.setattr(bnb, "__version__", "0.43.1")  # a release older than the CPU path was tested with: named
    with pytest.raises(TrainingError, match=r"on the CPU needs bitsandbytes >= 0\.50\.2 .*found 0\.43\.1"):
        _preflight(config, config.training_arguments())
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(TrainingError, match=r"mode qlora .*needs bitsandbytes.*pip install 'phi3v\[qlora\]'"):
        _preflight(config, config.training_arguments())
    with pytest.raises(TrainingError, match="needs bitsandbytes"):
        train(config)
    assert not (tmp_path / "run").exists(), "nothing written for a run that cannot start"


def test_the_lm_linears_are_nf4_and_only_the_adapters_train(tiny_model_dir, tiny_dataset_dir, tmp_path):
    config = _config(tiny_model_dir, tiny_dataset_dir, tmp_path / "run")
    model, _ = load_model_and_processor(config, config.training_arguments())
    original = Phi3VForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    layers = _lm_4bit_layers(model)
    per_layer = 4  # qkv_proj, o_proj, gate_up_proj, down_proj
    assert len(layers) == len(list(lm_linear_layers(original))) == per_layer * original.config.num_hidden_layers
    for (_, _, linear), layer in zip(lm_linear_layers(original), layers, strict=True):
        assert layer.weight.dtype == torch.uint8 and layer.weight.numel() * 2 == linear.weight.numel()
        assert tuple(layer.weight.quant_state.shape) == tuple(linear.weight.shape)
        dequantized = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)  # (out, in)
        torch.testing.assert_close(dequantized, nf4_round_trip(linear.weight), rtol=0, atol=0)
        assert 0 < (dequantized - linear.weight).abs().max() < 0.2 * linear.weight.abs().max()  # lossy, but close
    # the vision tower and lm_head stay full precision; the 4-bit weights count their logical size
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.base_model.model.model.vision_embed_tokens.modules())
    assert type(model.base_model.model.lm_head) is torch.nn.Linear
    assert {p.dtype for p in model.parameters()} == {torch.uint8, torch.float32}
    lora = load_train_config(None, tiny_config_args(tiny_model_dir, tiny_dataset_dir, tmp_path / "lora"))
    lora_model, _ = load_model_and_processor(lora, lora.training_arguments())
    assert parameter_counts(model) == parameter_counts(lora_model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable
    # backward reaches the adapters through the 4-bit layers: lora_B starts at zero (so lora_A gets no gradient yet);
    # layer 0's lora_B gets one only through the NF4 linears of the layers above it
    processor = Phi3VProcessor.from_pretrained(tiny_model_dir)
    images = _test_images(tiny_dataset_dir, 2)
    prompt = processor.apply_chat_template([{"role": "user", "content": "<|image_1|>What is shown in this image?"}])
    batch = processor([prompt] * 2, images=images, padding_side="left", return_tensors="pt")
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    first = [p for n, p in model.named_parameters() if "lora_B" in n and "model.layers.0." in n]
    assert len(first) == 4 and math.isfinite(loss.item())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in first)


def test_an_nf4_linear_computes_with_its_dequantized_weight_in_eval_and_after_it():
    torch.manual_seed(0)
    for bias in (False, True):
        linear = torch.nn.Linear(64, 192, bias=bias)
        layer = nf4_linear(linear, torch.float32, "cpu")
        dequantized = nf4_round_trip(linear.weight)  # (192, 64)
        x = torch.randn(3, 64, requires_grad=True)  # (batch, in)
        expected = x @ dequantized.T + (linear.bias if bias else 0)  # (3, 192)
        layer.eval()
        with torch.no_grad():  # bitsandbytes would repack the weight here on an AVX512-BF16 CPU (phi3v.quantization)
            torch.testing.assert_close(layer(x.detach()), expected.detach(), rtol=0, atol=1e-6)
        layer.train()
        out = layer(x)  # (3, 192)
        out.sum().backward()
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(x.grad, torch.ones(3, 192) @ dequantized, rtol=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------------------------------- runs
@pytest.mark.slow
def test_a_killed_qlora_run_resumes_to_the_uninterrupted_runs_losses_and_adapter(runs):
    reference_dir, out = runs["root"] / "reference", runs["root"] / "killed"
    # during training: every LM linear a Linear4bit with uint8 codes, before and after the evaluation at step 4
    watched = runs["watch"].steps
    assert [s["step"] for s in watched] == list(range(1, STEPS + 1))
    for s in watched:
        assert s["layers"] == 8 and s["uint8"] and s["plain_lm_linears"] == 0, s
        assert not s["packed_for_cpu"], s  # bitsandbytes' CPU inference repacking stays off (phi3v.quantization)
    assert KILL_AFTER <= int(runs["killed_at"].name.split("-")[1]) < STEPS
    resumed, reference = runs["resumed"], runs["reference"]
    assert resumed.resumed_from == str(runs["killed_at"]) and resumed.global_step == reference.global_step == STEPS
    assert resumed.mode == "qlora" and resumed.parameters == reference.parameters
    expected, got = logged_losses(reference_dir), logged_losses(out)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in expected.values())
    for step in expected:
        assert math.isclose(got[step], expected[step], rel_tol=1e-5, abs_tol=1e-6), (step, expected, got)
    if not torch.cuda.is_available():  # on CPU the resumed run is bit-identical (same kernels, restored RNG states)
        assert got == expected, (expected, got)
    assert expected[STEPS] < expected[1], expected
    ref_adapter = load_file(reference_dir / "adapter_model.safetensors")
    res_adapter = load_file(out / "adapter_model.safetensors")
    assert ref_adapter.keys() == res_adapter.keys() and any(".layers.0.self_attn.qkv_proj." in k for k in ref_adapter)
    worst = max((res_adapter[k] - v).abs().max().item() for k, v in ref_adapter.items())
    print(f"\nresumed vs uninterrupted adapter: max |diff| {worst:.3g}")
    for key, value in ref_adapter.items():
        torch.testing.assert_close(res_adapter[key], value, rtol=1e-5, atol=1e-7)
    if not torch.cuda.is_available():
        assert worst == 0.0
    # the adapters moved away from their initialisation (lora_B starts at zero)
    initial = {n.replace(".default", ""): v for n, v in runs["watch"].initial.items()}
    for key, value in ref_adapter.items():
        start = next(v for n, v in initial.items() if n.endswith(key.removeprefix("base_model.model.")))
        assert not torch.equal(value, start), key


@pytest.mark.slow
def test_evaluate_and_export_of_the_resumed_run(runs, tiny_model_dir, tiny_dataset_dir, capsys):
    run = runs["root"] / "killed"
    evaluation = ["--data", str(tiny_dataset_dir), "--out", str(run / "eval"), "--device", "cpu", "--quiet"]
    options = ["--batch-size", "4", "--max-new-tokens", "8", "--no-ablation"]
    assert main(["evaluate", "--model", str(run), *evaluation, *options]) == 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["model_kind"] == "adapter" and metrics["qlora_base"] == "nf4"
    assert metrics["counts"]["rows"] == metrics["counts"]["scored"] == 5
    export = runs["root"] / "export"
    assert main(["export", "--model", str(run), "--out", str(export)]) == 0
    info = json.loads((export / "export_info.json").read_text())
    assert info["mode"] == "qlora" and info["qlora_base"] == "nf4" and info["source_kind"] == "adapter"
    assert info["dtype"] == "float32" and info["metrics_source"] == str(run / "eval" / "metrics.json")
    assert "NF4-dequantized base weights it was trained against" in (export / "README.md").read_text()
    capsys.readouterr()

    # the adapter on its NF4 base, as it trained (Linear4bit + peft's bnb LoRA layers, not merged), and that base alone
    from peft import PeftModel

    def nf4_base() -> torch.nn.Module:
        base = Phi3VForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        _quantize_lm_4bit(base, torch.float32, torch.device("cpu"))
        return base.eval()

    trained = PeftModel.from_pretrained(nf4_base(), str(run)).eval()
    assert len(_lm_4bit_layers(trained)) == 8
    exported = load_for_inference(str(export), device="cpu", dtype="float32")
    original = load_for_inference(str(run), device="cpu", dtype="float32", qlora_base="original")
    assert exported.kind == "exported" and original.qlora_base == "original"
    processor = exported.processor
    images = _test_images(tiny_dataset_dir, 5)  # the whole test split
    models = {"trained": trained, "exported": exported.model, "original": original.model, "no adapter": nf4_base()}
    logits = {name: _logits(model, processor, images) for name, model in models.items()}  # (5, seq, vocab) each
    answers = {name: _answers(model, processor, images) for name, model in models.items()}
    gap = {name: (logits[name] - logits["trained"]).abs() for name in models}  # (5, seq, vocab)
    top1 = {name: (logits[name].argmax(-1) == logits["trained"].argmax(-1)).float().mean().item() for name in models}
    same = {name: sum(answers[name][i] == answers["trained"][i] for i in range(5)) for name in models}
    print(f"\nvs the adapter on NF4 (logits up to {logits['trained'].abs().max().item():.3g}):")
    for name in ("exported", "original", "no adapter"):
        print(
            f"  {name}: max |logit diff| {gap[name].max().item():.3g}, mean {gap[name].mean().item():.3g}, "
            f"top-1 token equal at {100 * top1[name]:.1f} % of positions, greedy answers equal {same[name]}/5"
        )
    nf4_gap, original_gap = gap["exported"].max().item(), gap["original"].max().item()
    # merged into the NF4 round trip, the export computes what the trained model computed, up to float rounding
    assert nf4_gap < 1e-4
    assert answers["exported"] == answers["trained"]
    # merged into the original weights it does not: the difference is the quantization error, far above rounding
    assert original_gap > 100 * max(nf4_gap, 1e-6)


@pytest.mark.slow
def test_a_qlora_adapter_loads_without_bitsandbytes_only_on_the_original_base(runs, monkeypatch):
    run = runs["root"] / "reference"
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    missing = r"needs bitsandbytes.*pip install 'phi3v\[qlora\]'.*--qlora-base original"
    with pytest.raises(ModelLoadError, match=missing):
        load_for_inference(str(run), device="cpu")
    loaded = load_for_inference(str(run), device="cpu", qlora_base="original")
    assert loaded.kind == "adapter" and loaded.qlora_base == "original"
    with pytest.raises(ModelLoadError, match="qlora_base must be nf4 or original"):
        load_for_inference(str(run), device="cpu", qlora_base="nf8")


def test_every_answering_command_takes_qlora_base(capsys):
    from phi3v.cli import _options, build_parser
    from phi3v.evaluate import EvaluateOptions
    from phi3v.export import ExportOptions
    from phi3v.predict import PredictOptions
    from phi3v.serve import ServeOptions

    parser = build_parser()
    commands = [
        (["evaluate", "--model", "m", "--data", "d", "--out", "o"], EvaluateOptions),
        (["predict", "--model", "m", "photo.jpg"], PredictOptions),
        (["export", "--model", "m", "--out", "o"], ExportOptions),
        (["serve", "--model", "m"], ServeOptions),
    ]
    for argv, options in commands:
        assert _options(options, parser.parse_args(argv)).qlora_base == "nf4"
        assert _options(options, parser.parse_args([*argv, "--qlora-base", "original"])).qlora_base == "original"
        with pytest.raises(SystemExit):
            parser.parse_args([*argv, "--qlora-base", "fp4"])
    assert "invalid choice: 'fp4'" in capsys.readouterr().err
