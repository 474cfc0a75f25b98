"""Phi-3-Vision processor: text with ``<|image_N|>`` tags (+ images) → model inputs (+ training labels).

Reference: ``processing_phi3_v.py`` of ``microsoft/Phi-3-vision-128k-instruct`` / ``Phi-3.5-vision-instruct``
(``Phi3VProcessor._convert_images_texts_to_inputs``; phi3v-reference.md §5). The text handling follows it
exactly:

- the text is split on ``r"<\\|image_\\d+\\|>"`` and **every chunk is tokenised separately with the tokenizer's
  default special tokens**, so each chunk (an empty trailing one included) starts with its own BOS ``<s>``;
- between chunk ``k`` and ``k+1`` goes a run of ``num_img_tokens[k]`` image placeholder tokens, where
  ``num_img_tokens`` comes from the image processor (757 for a square image at ``num_crops=4``, 313 at 1).

Deliberate differences from the reference, all documented on the methods below:

- the placeholder is ONE real token id, `Phi3VProcessor.image_token_id` (``<|image|>``; the official id 32044 when
  the tokenizer has no such token), instead of the reference's negative ids ``-image_number``. The model replaces
  the runs in order of appearance, which is why tags must be exactly ``<|image_1|> … <|image_n|>``, in order,
  each once, per sample (the reference also accepted repeated or reordered tags);
- batches of several texts (the reference handles one string), with right or left padding and an attention mask;
- truncation that never cuts through an image placeholder run;
- `Phi3VProcessor.build_training_batch` for supervised fine-tuning labels (answer-only loss);
- ``save_pretrained`` / ``from_pretrained`` are explicit (no ``trust_remote_code``, no auto-class registration)
  and accept image-processor overrides such as ``num_crops=4`` at load time, like the official README's
  ``AutoProcessor.from_pretrained(model_id, num_crops=4)`` with the hub's remote code.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase, PreTrainedTokenizerFast, ProcessorMixin
from transformers.utils import PROCESSOR_NAME

from phi3v.model.configuration import IMAGE_TOKEN_ID
from phi3v.model.hub import resolve_model_folder
from phi3v.model.image_processing import Phi3VImageProcessor
from phi3v.model.tokenizer import PHI3V_CHAT_TEMPLATE

logger = logging.getLogger(__name__)

#: Official id of ``<|image|>`` (reference §5.3), used when the tokenizer has none; an alias of
#: `phi3v.model.configuration.IMAGE_TOKEN_ID`.
OFFICIAL_IMAGE_TOKEN_ID = IMAGE_TOKEN_ID
DEFAULT_IMAGE_TOKEN = "<|image|>"
END_TOKEN = "<|end|>"
#: Label value ignored by `torch.nn.CrossEntropyLoss`.
IGNORE_INDEX = -100

#: Splits a text into the chunks around its image tags (non-capturing, as in the reference).
IMAGE_TAG_PATTERN = re.compile(r"<\|image_\d+\|>")
_IMAGE_TAG_NUMBER = re.compile(r"<\|image_(\d+)\|>")

#: One image as accepted by `Phi3VImageProcessor`: a PIL image, an HWC uint8 array, a path or encoded bytes.
ImageLike = Image.Image | np.ndarray | str | os.PathLike | bytes

# Keyword arguments of `from_pretrained` that go to the hub / cache layer of both sub-loaders.
_HUB_KWARGS = ("cache_dir", "local_files_only", "token", "revision")
# Keyword arguments of `from_pretrained` that configure the processor itself (the rest go to the image processor).
_PROCESSOR_KWARGS = ("chat_template", "image_token", "image_token_id")
#: What `Phi3VProcessor.from_pretrained` downloads for a hub id: configs, tokenizer and chat-template files, never the
#: (~8 GB) weights.
PROCESSOR_HUB_ALLOW_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja"]
#: The `tokenizers` serialisation of a fast tokenizer (the file the official checkpoints' pipeline is defined by).
TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a folder's tokenizer so that it encodes exactly as its ``tokenizer.json`` pipeline does.

    The official Phi-3-Vision checkpoints declare ``"tokenizer_class": "LlamaTokenizer"`` next to a ``tokenizer.json``
    whose normalizer prepends ``"▁"`` to every piece of text between added tokens. transformers 5's
    ``LlamaTokenizer`` (what `transformers.AutoTokenizer` picks for them) rebuilds the pipeline and replaces that
    normalizer with ``Metaspace(prepend_scheme="first")``, which drops the ``"▁"`` (id 29871) Phi-3 emits after
    every special token before ``"\\n"`` (``"<|user|>\\n"`` → ``[32010, 29871, 13]`` becomes ``[32010, 13]``) and
    the doubled ``"▁"`` before a leading space. The checkpoints were trained on the file's pipeline (which is what
    transformers 4.38's ``LlamaTokenizerFast`` ran when the hub's remote code was written), so when the folder has
    a ``tokenizer.json`` it is loaded with `transformers.PreTrainedTokenizerFast` (``TokenizersBackend`` in
    transformers 5), which keeps the file's normalizer, pre-tokenizer, model, added tokens and post-processor
    (BOS ``<s>`` by default, none with ``add_special_tokens=False``) as they are, and takes the metadata (bos / eos /
    pad / unk tokens, chat template, ``added_tokens_decoder``, padding side) from ``tokenizer_config.json``. A
    folder with only a SentencePiece ``tokenizer.model`` falls back to `transformers.AutoTokenizer`.

    Args:
        folder (`str` or `os.PathLike`): A local folder with the tokenizer files.

    Returns:
        `transformers.PreTrainedTokenizerBase`: The tokenizer.

    Raises:
        OSError: If the folder holds no loadable tokenizer.
    """
    folder = Path(folder)
    if (folder / TOKENIZER_FILE).is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        logger.info("loaded the tokenizer from %s as written (PreTrainedTokenizerFast)", folder / TOKENIZER_FILE)
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        logger.info(
            "no %s in %s: loaded the tokenizer with AutoTokenizer (%s)",
            TOKENIZER_FILE,
            folder,
            type(tokenizer).__name__,
        )
    return tokenizer


def _vocab_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """Id of ``token`` in the tokenizer's vocabulary (added tokens included), or None when it has none."""
    return tokenizer.get_vocab().get(token)


def parse_image_tags(text: str, sample_index: int = 0) -> int:
    """Check the ``<|image_N|>`` tags of one text and return how many there are.

    Tags must be exactly ``<|image_1|>``, ``<|image_2|>``, …, ``<|image_n|>``, in this order of appearance, each
    once: the model fills the placeholder runs with the images in order, so any other numbering would silently
    pair text with the wrong image.

    Args:
        text (`str`): One sample's text.
        sample_index (`int`, *optional*, defaults to 0): Index of the sample in its batch, for the error message.

    Returns:
        `int`: The number of image tags ``n`` (0 when the text has none).

    Raises:
        ValueError: If the tags are not exactly 1..n in order of appearance (missing, repeated, out of order, or
            not starting at 1); the message names the sample and the tags found.
    """
    numbers = [int(n) for n in _IMAGE_TAG_NUMBER.findall(text)]
    expected = list(range(1, len(numbers) + 1))
    if numbers != expected:
        found = ", ".join(f"<|image_{n}|>" for n in numbers)
        if len(set(numbers)) != len(numbers):
            problem = "a tag is repeated"
        elif sorted(numbers) == expected:
            problem = "tags are out of order"
        else:
            problem = "tags are missing or do not start at <|image_1|>"
        raise ValueError(
            f"sample {sample_index}: image tags must be <|image_1|> … <|image_{len(numbers)}|> in order of "
            f"appearance, each once; {problem} (found: {found})"
        )
    return len(numbers)


def _is_image_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


class Phi3VProcessor(ProcessorMixin):
    """Turns prompts with ``<|image_N|>`` tags and images into Phi-3-Vision inputs.

    Args:
        image_processor (`Phi3VImageProcessor`): Produces ``pixel_values``, ``image_sizes`` and the number of
            placeholder tokens per image.
        tokenizer (`PreTrainedTokenizerBase`): Phi-3 tokenizer (the official one, or `phi3v.model.tokenizer.
            train_tokenizer`'s). It must prepend BOS by default, as Phi-3's does.
        chat_template (`str`, *optional*): Jinja chat template; defaults to the tokenizer's, else
            `PHI3V_CHAT_TEMPLATE`.
        image_token (`str`, *optional*, defaults to ``"<|image|>"``): The placeholder token.
        image_token_id (`int`, *optional*): Id of the placeholder token; defaults to the tokenizer's id for
            ``image_token`` when it has one, else 32044 (the official id, reference §5.3).

    Example::

        processor = Phi3VProcessor(Phi3VImageProcessor(num_crops=4), tokenizer)
        prompt = processor.apply_chat_template([{"role": "user", "content": "<|image_1|>\\nWhat is shown?"}])
        inputs = processor(prompt, images=[image])  # input_ids, attention_mask, pixel_values, image_sizes
    """

    def __init__(
        self,
        image_processor: Phi3VImageProcessor,
        tokenizer: PreTrainedTokenizerBase,
        chat_template: str | None = None,
        image_token: str = DEFAULT_IMAGE_TOKEN,
        image_token_id: int | None = None,
    ) -> None:
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None) or PHI3V_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token = image_token
        if image_token_id is None:
            image_token_id = _vocab_id(tokenizer, image_token)
        self._image_token_id = int(image_token_id) if image_token_id is not None else OFFICIAL_IMAGE_TOKEN_ID
        self._end_token_id = _vocab_id(tokenizer, END_TOKEN)
        self._warned_boundary = False

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def image_token_id(self) -> int:
        """Id of the image placeholder token repeated ``num_img_tokens`` times per image."""
        return self._image_token_id

    @property
    def pad_token_id(self) -> int | None:
        """Padding id: the tokenizer's pad token, falling back to its eos token."""
        if self.tokenizer.pad_token_id is not None:
            return self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id

    @property
    def end_token_id(self) -> int | None:
        """Id of ``<|end|>``, which ends every turn (stop token for generation), or None if the vocab lacks it."""
        return self._end_token_id

    @property
    def model_input_names(self) -> list[str]:
        """Names of the model inputs this processor produces."""
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes"]

    # ------------------------------------------------------------------------------------------------ main API
    def __call__(
        self,
        text: str | list[str],
        images: ImageLike | Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | None = None,
        padding: bool | str = True,
        padding_side: str | None = None,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """Tokenise texts with image tags the reference way and process their images.

        Args:
            text (`str` or `list[str]`): One text or a batch. Each may contain ``<|image_1|>`` … ``<|image_n|>``
                (see `parse_image_tags`); a text without tags and images is plain tokenisation.
            images (*optional*): The images for the tags: one image, a flat list consumed in order across the batch
                (sample 0's tags first), or one list per sample. An image is anything `Phi3VImageProcessor` takes:
                a PIL image, an HWC uint8 array, a path or encoded bytes.
            padding (`bool` or `str`, *optional*, defaults to True): True/``"longest"`` pads to the longest sample,
                ``"max_length"`` to ``max_length``, False/``"do_not_pad"`` does not pad (then tensors need equal
                lengths).
            padding_side (`str`, *optional*): ``"right"`` (default; training) or ``"left"`` (generation).
            truncation (`bool`, *optional*, defaults to False): Cut samples longer than ``max_length`` at the right.
                Only text after the last image can be cut: a cut that would remove any image placeholder token
                raises ValueError instead.
            max_length (`int`, *optional*): Limit for truncation / length for ``padding="max_length"``.
            return_tensors (`str`, *optional*, defaults to ``"pt"``): Tensor type, or None for Python lists.

        Returns:
            `BatchFeature`: ``input_ids`` ``(batch, seq)`` int64 and ``attention_mask`` ``(batch, seq)`` (0 exactly on
            padding); with images also ``pixel_values`` ``(num_images, num_crops + 1, 3, 336, 336)`` float32 and
            ``image_sizes`` ``(num_images, 2)`` int64 (padded HD height, width), images in order of appearance.

        Raises:
            ValueError: On bad image tags, an image count that does not match the tags, a truncation that would cut
                an image placeholder run, or inconsistent padding arguments. Messages name the sample index.
        """
        texts = self._as_text_list(text)
        per_sample_images = self._assign_images(images, texts)
        image_features, counts = self._process_images(per_sample_images, return_tensors)
        sequences = [self._tokenize_sample(t, counts[i], i) for i, t in enumerate(texts)]
        if truncation and max_length is not None:
            sequences = [self._truncate(seq, max_length, i)[0] for i, seq in enumerate(sequences)]
        input_ids, attention_mask, _ = self._pad(sequences, None, padding, padding_side, max_length, return_tensors)
        data: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, **image_features}
        return BatchFeature(data, tensor_type=return_tensors)

    def build_training_batch(
        self,
        prompts: list[str],
        answers: list[str],
        images: ImageLike | Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | None = None,
        padding_side: str = "right",
        max_length: int | None = None,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """Build a supervised fine-tuning batch with answer-only labels.

        Each full sequence is ``prompt + answer + "<|end|>"``, tokenised as ONE text the reference way (so the
        model trains on exactly the ids it sees at inference: the prompt, as produced by `__call__`, followed by
        the answer). ``labels`` equals ``input_ids`` on the answer tokens and the final ``<|end|>`` token and is
        ``-100`` everywhere else: prompt tokens, image placeholder tokens, BOS tokens and padding.

        The prompt/answer boundary is the length of the prompt's own tokenisation, which must be a prefix of the
        full tokenisation. If a tokenizer merges tokens across the boundary (e.g. an answer starting with a
        character that merges with the prompt's trailing ``"\\n"``), the longest common prefix is used instead and
        a warning is logged once per processor.

        Args:
            prompts (`list[str]`): Chat-formatted user turns ending with the generation prompt
                ``"<|assistant|>\\n"`` (e.g. from `apply_chat_template`), containing the image tags.
            answers (`list[str]`): The assistant answers (no image tags, no ``<|end|>``).
            images (*optional*): The prompts' images, as in `__call__`.
            padding_side (`str`, *optional*, defaults to ``"right"``): ``"right"`` or ``"left"``.
            max_length (`int`, *optional*): Truncate longer sequences at the right (answer first; a warning is
                logged when a whole answer is cut off); a cut that would remove an image placeholder token raises
                ValueError. Samples are padded to the longest.
            return_tensors (`str`, *optional*, defaults to ``"pt"``): Tensor type, or None for Python lists.

        Returns:
            `BatchFeature`: ``input_ids``, ``attention_mask``, ``labels`` (all ``(batch, seq)``), and with images
            ``pixel_values`` and ``image_sizes`` as in `__call__`.

        Raises:
            ValueError: If ``prompts`` and ``answers`` differ in length, an answer contains an image tag, the
                tokenizer has no ``<|end|>`` token, or for any reason `__call__` raises.
        """
        prompts = self._as_text_list(prompts)
        answers = self._as_text_list(answers)
        if len(prompts) != len(answers):
            raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers")
        for i, answer in enumerate(answers):
            if IMAGE_TAG_PATTERN.search(answer):
                raise ValueError(f"sample {i}: the answer contains an image tag; image tags belong in the prompt")
        if self.end_token_id is None:
            raise ValueError(f"the tokenizer has no {END_TOKEN} token, which ends every Phi-3 turn")

        per_sample_images = self._assign_images(images, prompts)
        image_features, counts = self._process_images(per_sample_images, return_tensors)
        bos_id = self.tokenizer.bos_token_id
        sequences: list[list[int]] = []
        label_rows: list[list[int]] = []
        for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            prompt_ids = self._tokenize_sample(prompt, counts[i], i)
            full_ids = self._tokenize_sample(prompt + answer + END_TOKEN, counts[i], i)
            boundary = self._answer_start(prompt_ids, full_ids, i)
            labels = [IGNORE_INDEX] * boundary + full_ids[boundary:]
            for pos in range(boundary, len(full_ids)):  # defensive: never learn placeholders or BOS
                if full_ids[pos] == self.image_token_id or (bos_id is not None and full_ids[pos] == bos_id):
                    labels[pos] = IGNORE_INDEX
            if max_length is not None:
                full_ids, labels = self._truncate(full_ids, max_length, i, labels)
                if all(label == IGNORE_INDEX for label in labels):
                    logger.warning("sample %d: max_length=%d cuts off the whole answer (no loss)", i, max_length)
            sequences.append(full_ids)
            label_rows.append(labels)

        input_ids, attention_mask, labels = self._pad(
            sequences, label_rows, True, padding_side, max_length, return_tensors
        )
        data: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            **image_features,
        }
        return BatchFeature(data, tensor_type=return_tensors)

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]] | list[list[dict[str, Any]]],
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        images: Any = None,
        **kwargs: Any,
    ) -> str | list[str] | BatchFeature:
        """Render conversation(s) into the Phi-3-V prompt format.

        ``[{"role": "user", "content": "<|image_1|>\\nWhat is shown in this image?"}]`` renders to
        ``"<|user|>\\n<|image_1|>\\nWhat is shown in this image?<|end|>\\n<|assistant|>\\n"`` (no BOS: it comes
        from tokenisation). ``content`` may also be a list of parts in the transformers multimodal format
        (``{"type": "image"}`` / ``{"type": "text", "text": ...}``): image parts become ``"<|image_k|>\\n"``,
        numbered in order through the conversation, and an image object given in a part (``"image"``, ``"url"``
        or ``"path"`` key) is used when ``tokenize=True`` and ``images`` is None.

        Args:
            conversation: One conversation (list of ``{"role", "content"}`` messages) or a list of them.
            chat_template (`str`, *optional*): Template to use instead of the processor's (which is the
                tokenizer's when it has one, else `PHI3V_CHAT_TEMPLATE`).
            add_generation_prompt (`bool`, *optional*, defaults to True): Append ``"<|assistant|>\\n"``.
            tokenize (`bool`, *optional*, defaults to False): Also run the processor on the rendered text(s).
            images (*optional*): Images for ``tokenize=True``, as in `__call__`.
            **kwargs: Passed to `__call__` when ``tokenize=True`` (``padding_side``, ``return_tensors``, …).

        Returns:
            `str` (one conversation) or `list[str]` (several); a `BatchFeature` when ``tokenize=True``.
        """
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        template = chat_template or self.chat_template or PHI3V_CHAT_TEMPLATE
        rendered: list[str] = []
        found_images: list[list[Any]] = []
        for conv in conversations:
            messages, conv_images = self._normalize_messages(conv)
            rendered.append(
                self.tokenizer.apply_chat_template(
                    messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
                )
            )
            found_images.append(conv_images)
        if tokenize:
            if images is None and any(found_images):
                images = found_images
            return self(rendered if batched else rendered[0], images=images, **kwargs)
        return rendered if batched else rendered[0]

    # ------------------------------------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> list[str]:
        """Save the tokenizer files, the image processor config and ``processor_config.json``.

        ``processor_config.json`` holds what `ProcessorMixin.to_dict` writes (``processor_class`` and the nested
        ``image_processor`` config) plus ``image_token`` and ``image_token_id``, and ``chat_template`` only when it
        differs from the tokenizer's (which is saved with the tokenizer).

        Args:
            save_directory (`str` or `os.PathLike`): Target directory (created if needed).
            push_to_hub (`bool`, *optional*, defaults to False): Not supported; upload the directory with
                ``huggingface_hub`` instead.
            **kwargs: Ignored (accepted for signature compatibility with `ProcessorMixin.save_pretrained`).

        Returns:
            `list[str]`: The files written.

        Raises:
            ValueError: If ``push_to_hub`` is True.
        """
        if push_to_hub:
            raise ValueError("push_to_hub is not supported: save, then upload with huggingface_hub")
        save_directory = os.fspath(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        files = [os.fspath(f) for f in self.tokenizer.save_pretrained(save_directory)]
        files += [os.fspath(f) for f in self.image_processor.save_pretrained(save_directory)]
        config = self.to_dict()
        config.update(
            processor_class=type(self).__name__, image_token=self.image_token, image_token_id=self.image_token_id
        )
        if self.chat_template != getattr(self.tokenizer, "chat_template", None):
            config["chat_template"] = self.chat_template
        config_file = os.path.join(save_directory, PROCESSOR_NAME)
        with open(config_file, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        files.append(config_file)
        logger.info("saved %s to %s", type(self).__name__, save_directory)
        return files

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Phi3VProcessor:
        """Load a processor saved by `save_pretrained`, or from a hub checkpoint already in the local cache.

        Loads ``Phi3VImageProcessor.from_pretrained`` and the tokenizer (`load_tokenizer`: the ``tokenizer.json``
        pipeline exactly as written, not transformers 5's rebuilt ``LlamaTokenizer``) from the same place and reads
        ``processor_config.json`` (``image_token``, ``image_token_id``, ``chat_template``) if present. A hub id
        downloads only `PROCESSOR_HUB_ALLOW_PATTERNS` (configs, tokenizer files), never the weights.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): A directory, or a hub id such as
                ``"microsoft/Phi-3.5-vision-instruct"`` (needs the hub or its local cache).
            **kwargs: Hub arguments (``cache_dir``, ``revision``, ``token``, ``local_files_only``,
                ``force_download``, ``subfolder``, ``proxies``); processor arguments (``image_token``,
                ``image_token_id``, ``chat_template``); ``trust_remote_code`` (ignored, for drop-in use with the
                official snippets); everything else overrides the image processor's config, e.g. ``num_crops=16``.

        Returns:
            `Phi3VProcessor`: The processor.

        Raises:
            OSError: If the files cannot be found locally nor fetched (e.g. a hub id while offline); the message
                names the source and the underlying error.
        """
        kwargs.pop("trust_remote_code", None)
        hub_kwargs = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        processor_kwargs = {k: kwargs.pop(k) for k in _PROCESSOR_KWARGS if k in kwargs}
        folder = resolve_model_folder(
            pretrained_model_name_or_path, allow_patterns=list(PROCESSOR_HUB_ALLOW_PATTERNS), **hub_kwargs
        )
        try:
            config_file = folder / PROCESSOR_NAME
            config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
            image_processor = Phi3VImageProcessor.from_pretrained(folder, **kwargs)
            tokenizer = load_tokenizer(folder)
        except OSError as err:
            raise OSError(
                f"could not load a Phi3VProcessor from {os.fspath(folder)!r}: {err}. The folder needs the files "
                "written by Phi3VProcessor.save_pretrained (or a hub checkpoint's processor and tokenizer files)."
            ) from err
        for key in _PROCESSOR_KWARGS:
            if key not in processor_kwargs and config.get(key) is not None:
                processor_kwargs[key] = config[key]
        return cls(image_processor, tokenizer, **processor_kwargs)

    # ------------------------------------------------------------------------------------------------ internals
    @staticmethod
    def _as_text_list(text: str | Sequence[str]) -> list[str]:
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("text must be a string or a non-empty list of strings")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"sample {i}: text must be a str, got {type(t).__name__}")
        return texts

    @staticmethod
    def _assign_images(images: Any, texts: list[str]) -> list[list[Any]]:
        """Check every text's tags and give each sample its images (flat list consumed in order, or per sample)."""
        tag_counts = [parse_image_tags(t, i) for i, t in enumerate(texts)]
        if images is None:
            for i, n in enumerate(tag_counts):
                if n:
                    raise ValueError(f"sample {i}: the text has {n} image tag(s) but no images were given")
            return [[] for _ in texts]
        if not _is_image_list(images):
            images = [images]
        nested = [_is_image_list(x) or x is None for x in images]
        if images and all(nested):  # one list per sample
            if len(images) != len(texts):
                raise ValueError(f"got {len(images)} per-sample image lists for {len(texts)} texts")
            per_sample = [list(x) if x is not None else [] for x in images]
            for i, (n, imgs) in enumerate(zip(tag_counts, per_sample, strict=True)):
                if n != len(imgs):
                    raise ValueError(f"sample {i}: the text has {n} image tag(s) but {len(imgs)} image(s) were given")
            return per_sample
        if any(nested):
            raise ValueError("images must be a flat list of images or one list per sample, not a mix of both")
        per_sample, start = [], 0
        for i, n in enumerate(tag_counts):
            if start + n > len(images):
                raise ValueError(
                    f"sample {i}: the text has {n} image tag(s) but only {len(images) - start} image(s) are left "
                    f"({len(images)} given for {sum(tag_counts)} tags in the batch)"
                )
            per_sample.append(list(images[start : start + n]))
            start += n
        if start != len(images):
            raise ValueError(
                f"sample {len(texts) - 1}: {len(images) - start} image(s) left over after the last sample's tags "
                f"({len(images)} given for {sum(tag_counts)} tags in the batch)"
            )
        return per_sample

    def _process_images(
        self, per_sample_images: list[list[Any]], return_tensors: str | None
    ) -> tuple[dict[str, Any], list[list[int]]]:
        """Run the image processor once over all images; return its outputs and the token counts per sample."""
        flat = [img for imgs in per_sample_images for img in imgs]
        if not flat:
            return {}, [[] for _ in per_sample_images]
        features = self.image_processor(flat, return_tensors=return_tensors)
        num_tokens = [int(n) for n in features["num_img_tokens"]]
        counts, start = [], 0
        for imgs in per_sample_images:
            counts.append(num_tokens[start : start + len(imgs)])
            start += len(imgs)
        return {"pixel_values": features["pixel_values"], "image_sizes": features["image_sizes"]}, counts

    def _tokenize_sample(self, text: str, num_img_tokens: list[int], sample_index: int) -> list[int]:
        """Reference §5.2: tokenise the chunks between tags separately (each gets BOS) and insert placeholder runs."""
        chunks = IMAGE_TAG_PATTERN.split(text)
        if len(chunks) - 1 != len(num_img_tokens):
            raise ValueError(
                f"sample {sample_index}: {len(chunks) - 1} image tag(s) but {len(num_img_tokens)} image(s)"
            )
        chunk_ids = self.tokenizer(chunks)["input_ids"]
        ids = list(chunk_ids[0])
        for n, next_chunk in zip(num_img_tokens, chunk_ids[1:], strict=True):
            ids += [self.image_token_id] * n
            ids += next_chunk
        return ids

    def _truncate(
        self, ids: list[int], max_length: int, sample_index: int, labels: list[int] | None = None
    ) -> tuple[list[int], list[int] | None]:
        """Cut at the right to ``max_length``, refusing to remove any image placeholder token."""
        if len(ids) <= max_length:
            return ids, labels
        if self.image_token_id in ids[max_length:]:
            last = len(ids) - 1 - ids[::-1].index(self.image_token_id)
            raise ValueError(
                f"sample {sample_index}: truncating to max_length={max_length} would cut through an image "
                f"placeholder run (its last image token is at position {last}, the sample has {len(ids)} tokens); "
                "raise max_length, shorten the text or use a smaller num_crops"
            )
        return ids[:max_length], (labels[:max_length] if labels is not None else None)

    def _pad(
        self,
        sequences: list[list[int]],
        label_rows: list[list[int]] | None,
        padding: bool | str,
        padding_side: str | None,
        max_length: int | None,
        return_tensors: str | None,
    ) -> tuple[list[list[int]], list[list[int]], list[list[int]] | None]:
        """Pad ids with `pad_token_id`, the mask with 0 and labels with -100, on the requested side."""
        side = padding_side or "right"
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        longest = max(len(s) for s in sequences)
        if padding is True or padding == "longest":
            target = longest
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            target = max(max_length, longest)
        elif padding is False or padding == "do_not_pad":
            target = None
            if return_tensors is not None and any(len(s) != longest for s in sequences):
                raise ValueError("samples have different lengths: use padding=True to return tensors")
        else:
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")

        pad_id = self.pad_token_id
        if target is not None and any(len(s) < target for s in sequences) and pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        out_ids, out_mask, out_labels = [], [], ([] if label_rows is not None else None)
        for i, seq in enumerate(sequences):
            n_pad = (target - len(seq)) if target is not None else 0
            mask = [1] * len(seq)
            if side == "right":
                out_ids.append(seq + [pad_id] * n_pad)
                out_mask.append(mask + [0] * n_pad)
                if out_labels is not None:
                    out_labels.append(label_rows[i] + [IGNORE_INDEX] * n_pad)
            else:
                out_ids.append([pad_id] * n_pad + seq)
                out_mask.append([0] * n_pad + mask)
                if out_labels is not None:
                    out_labels.append([IGNORE_INDEX] * n_pad + label_rows[i])
        return out_ids, out_mask, out_labels

    def _answer_start(self, prompt_ids: list[int], full_ids: list[int], sample_index: int) -> int:
        """Index of the first answer token in ``full_ids`` (see `build_training_batch`)."""
        n = len(prompt_ids)
        if full_ids[:n] == prompt_ids:
            return n
        common = 0
        for a, b in zip(prompt_ids, full_ids, strict=False):
            if a != b:
                break
            common += 1
        if not self._warned_boundary:
            logger.warning(
                "sample %d: the prompt's tokenisation is not a prefix of prompt+answer's (the tokenizer merges "
                "across the boundary); labels start at the longest common prefix (%d of %d prompt tokens). "
                "This warning is shown once.",
                sample_index,
                common,
                n,
            )
            self._warned_boundary = True
        return common

    @staticmethod
    def _normalize_messages(conversation: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
        """Turn list-of-parts contents into strings with ``<|image_k|>`` tags; collect images given in parts."""
        messages, images, k = [], [], 0
        for message in conversation:
            content = message.get("content")
            if isinstance(content, (list, tuple)):
                text = ""
                for part in content:
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind in ("image", "image_url"):
                        k += 1
                        text += f"<|image_{k}|>\n"
                        for key in ("image", "url", "path", "image_url"):
                            if part.get(key) is not None:
                                images.append(part[key])
                                break
                    elif kind == "text":
                        text += part.get("text", "")
                    else:
                        raise ValueError(f"unsupported content part {part!r}: expected type 'image' or 'text'")
                message = {**message, "content": text}
            messages.append(message)
        return messages, images
