"""Training data: a `phi3v prepare` dataset -> answer-only supervised batches of Phi-3-V inputs.

- `load_prepared_dataset` opens DIR/dataset (written by `phi3v prepare`) and checks it is one: manifest, splits,
  columns, non-empty splits, each failure named.
- `sequence_lengths` gives every row's token count without decoding a single image (the image tokens follow from
  the JPEG header's size, `Phi3VImageProcessor.num_image_tokens_for_size`), for length-grouped sampling.
- `Phi3VCollator` turns rows into a batch with `Phi3VProcessor.build_training_batch`: chat-formatted prompt,
  answer from the `AnswerTemplate`, loss on the answer and its ``<|end|>`` only. It runs inside the DataLoader's
  worker processes, so image decoding and the HD transform overlap the training step. With ``packing`` the batch
  becomes one padding-free row (`phi3v.data.packing.pack_batch`).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from phi3v.data.packing import pack_batch
from phi3v.metrics import AnswerTemplate

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("image", "title", "category", "price")
TRAIN_SPLIT = "train"
EVAL_SPLIT = "validation"


class DatasetError(ValueError):
    """A data folder that is not a usable `phi3v prepare` output."""


def load_prepared_dataset(folder: str | Path, splits: Sequence[str] = (TRAIN_SPLIT, EVAL_SPLIT)) -> dict[str, Any]:
    """Open the dataset `phi3v prepare` wrote under ``folder`` and check the splits a stage needs.

    Args:
        folder: The ``--out`` folder of `phi3v prepare` (holding ``manifest.json`` and ``dataset/``), or its
            ``dataset/`` sub-folder.
        splits: Splits that must exist with at least one row.

    Returns:
        `dict[str, datasets.Dataset]`: The requested splits.

    Raises:
        DatasetError: If the folder is missing, was not made by `phi3v prepare`, lacks a split or a column, or a
            needed split is empty. The message names the folder and what is wrong.
    """
    import datasets

    root = Path(folder)
    if root.name == "dataset" and (root.parent / "manifest.json").is_file():
        root = root.parent
    if not root.is_dir():
        raise DatasetError(f"data folder {str(root)!r} does not exist (make one with `phi3v prepare ... --out DIR`)")
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file() or not (root / "dataset").is_dir():
        raise DatasetError(
            f"{str(root)!r} is not a phi3v dataset: it has no manifest.json and dataset/ "
            "(the folder `phi3v prepare ... --out DIR` writes)"
        )
    try:
        json.loads(manifest_path.read_text(encoding="utf-8"))
        index = json.loads((root / "dataset" / "dataset_dict.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DatasetError(
            f"{str(root)!r}: cannot read the prepared dataset ({err}); it is not a complete phi3v prepare output"
        ) from err
    available = list(index.get("splits", []))
    out: dict[str, Any] = {}
    for name in splits:
        if name not in available:
            raise DatasetError(f"{str(root)!r}: no {name!r} split (has: {', '.join(available)})")
        split_dir = root / "dataset" / name
        state = split_dir / "state.json"
        empty = DatasetError(
            f"{str(root)!r}: split {name!r} is empty; re-run phi3v prepare with a larger catalog or other --splits"
        )
        if state.is_file() and not json.loads(state.read_text(encoding="utf-8")).get("_data_files"):
            raise empty  # datasets cannot even load a split saved with no rows
        try:
            split = datasets.load_from_disk(str(split_dir))
        except (OSError, ValueError, IndexError) as err:
            raise DatasetError(f"{str(root)!r}: cannot read split {name!r}: {err}") from err
        missing = [column for column in REQUIRED_COLUMNS if column not in split.column_names]
        if missing:
            raise DatasetError(
                f"{str(root)!r}: split {name!r} lacks the column(s) {', '.join(missing)} "
                f"(has: {', '.join(split.column_names)})"
            )
        if len(split) == 0:
            raise empty
        out[name] = split
    return out


def image_size_of(value: dict[str, Any]) -> tuple[int, int]:
    """(width, height) of an undecoded `datasets.Image` value, from the file header only."""
    source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
    with Image.open(source) as image:
        return image.size


def sequence_lengths(dataset: Any, processor: Any, prompt: str, answer_template: AnswerTemplate) -> list[int]:
    """Token count of every row (prompt + image tokens + answer + ``<|end|>``), without decoding images.

    Args:
        dataset (`datasets.Dataset`): Rows with ``image``, ``title``, ``category``, ``price``.
        processor (`Phi3VProcessor`): Gives the tokenizer and the image token count of a size.
        prompt (`str`): The chat-formatted prompt (one image tag).
        answer_template (`AnswerTemplate`): Formats each row's answer.

    Returns:
        `list[int]`: One length per row; equal to the row's unpadded ``input_ids`` length from the collator.
    """
    import datasets

    from phi3v.model.processing import IMAGE_TAG_PATTERN

    chunks = IMAGE_TAG_PATTERN.split(prompt)
    if len(chunks) != 2:
        raise ValueError(f"the prompt must hold exactly one image tag (<|image_1|>), got {len(chunks) - 1}: {prompt!r}")
    head, tail = chunks
    undecoded = dataset.cast_column("image", datasets.Image(decode=False))
    # as Phi3VProcessor tokenises: the text before the tag and the text after it, each chunk with its own BOS
    tails = [tail + answer_template.format(row) + "<|end|>" for row in dataset.remove_columns("image")]
    head_length = len(processor.tokenizer(head)["input_ids"])
    tail_lengths = [len(ids) for ids in processor.tokenizer(tails)["input_ids"]]
    lengths = []
    # row by row: a whole column of image bytes would sit in memory at once
    for row, tail_length in zip(undecoded.select_columns(["image"]), tail_lengths, strict=True):
        width, height = image_size_of(row["image"])
        lengths.append(head_length + processor.image_processor.num_image_tokens_for_size(width, height) + tail_length)
    return lengths


class Phi3VCollator:
    """Rows of a prepared dataset -> a `BatchFeature` of ``input_ids``, ``attention_mask``, ``labels``,
    ``pixel_values``, ``image_sizes``.

    Picklable, so DataLoader workers (fork or spawn) run it: image decoding, the HD transform and tokenisation all
    happen off the training process.

    Args:
        processor (`Phi3VProcessor`): The model's processor.
        prompt (`str`): The chat-formatted user turn ending in ``"<|assistant|>\\n"``, with one ``<|image_1|>``.
        answer_template (`AnswerTemplate`): Formats each row's answer.
        max_length (`int`, *optional*): Truncation length (`build_training_batch`).
        packing (`bool`, *optional*, defaults to False): Return one packed row (`pack_batch`) instead of a padded
            batch.
    """

    def __init__(
        self,
        processor: Any,
        prompt: str,
        answer_template: AnswerTemplate,
        max_length: int | None = None,
        packing: bool = False,
    ) -> None:
        self.processor = processor
        self.prompt = prompt
        self.answer_template = answer_template
        self.max_length = max_length
        self.packing = packing

    def __call__(self, rows: list[dict[str, Any]]) -> Any:
        images = [row["image"] for row in rows]
        answers = [self.answer_template.format(row) for row in rows]
        batch = self.processor.build_training_batch(
            [self.prompt] * len(rows), answers, images=images, max_length=self.max_length
        )
        return pack_batch(batch) if self.packing else batch
