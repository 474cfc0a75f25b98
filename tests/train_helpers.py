"""A tiny training setup shared by the training tests: a random tiny model folder and a prepared synth catalog.

The catalog's photos come in three shapes (square, wide, tall), so batches mix crop grids and token counts.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

SHAPES = ((256, 256), (448, 224), (224, 448))  # square, wide (1x2 crops at num_crops 4), tall (2x1)


def build_tiny_model(folder: Path) -> Path:
    """`phi3v init-model` (tiny, seed 0) into ``folder``."""
    from phi3v.model.random_init import write_random_checkpoint

    return write_random_checkpoint(folder, "tiny", seed=0, num_crops=4)


def build_prepared_catalog(folder: Path, n: int = 48, seed: int = 0) -> Path:
    """A `phi3v synth` catalog of ``n`` products, photos reshaped round-robin to `SHAPES`, run through prepare.

    Returns:
        `Path`: the prepared folder (``folder / "prepared"``).
    """
    from phi3v.data.synthetic import make_synthetic_catalog
    from phi3v.prepare import PrepareOptions, prepare

    catalog = make_synthetic_catalog(folder / "synth", n, seed=seed, image_size=256, quirks=False)
    for i, path in enumerate(sorted((catalog.parent / "images").glob("*.jpg"))):
        size = SHAPES[i % len(SHAPES)]
        if size != (256, 256):
            with Image.open(path) as image:
                image.convert("RGB").resize(size).save(path, quality=90)
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
