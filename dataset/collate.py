"""Collate functions that tokenise text in the DataLoader workers.

Every collate function returns a tuple in the official item order with each text column replaced by a `TextBatch`
(`.input_ids`, `.attention_mask`: LongTensor [B, L]; `.to(device)`), other columns collated by torch's default
rules (images stacked, ints to LongTensor). Batches per task (from `build_collate_fn`):

| task, split | batch |
|---|---|
| pretrain (also TA pretraining) | (image [B,3,H,W], text) |
| re train | (image, text, idx [B]) |
| re eval | (image, index [B]); texts are tokenised by the evaluator with `TEXT_SETTINGS['retrieval_eval']` |
| vqa train | (image, question, answer, weights [sum n], n: list[int]); answers flattened over the batch |
| vqa test | (image, question, question_id [B]) |
| nlvr train/eval | (image0, image1, text, label [B]) |
| ve train/eval | (image, text, label [B]) |
| grounding train | (image, text, idx [B]) |
| grounding test | (image, text, ref_id [B]) |

The tokenizer is any callable `tok(texts, padding=, truncation=, max_length=, return_tensors='pt')` returning an
object with `.input_ids` and `.attention_mask`; this module never imports `models/`. Collators are picklable
classes so they work with spawned DataLoader workers.

`pad_to_multiple_of` pads (never truncates) 'longest'-padded text up to a multiple, for few static shapes under
`torch.compile`; `fixed_length=True` pads the truncated call sites (pretrain, TA, VQA questions) to their fixed
length 25 instead. Extra padding is masked and so semantically neutral.
"""

from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import torch
from torch.utils.data import default_collate


class TextBatch(NamedTuple):
    """Tokenised text: input_ids and attention_mask, LongTensor [B, L]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "TextBatch":
        """Move both tensors to `device`."""
        return TextBatch(
            self.input_ids.to(device, non_blocking=non_blocking),
            self.attention_mask.to(device, non_blocking=non_blocking),
        )


@dataclass(frozen=True)
class TextSettings:
    """Tokenizer arguments of one call site."""

    padding: str = "longest"
    truncation: bool = False
    max_length: Optional[int] = None


_LONGEST = TextSettings()
_TRUNCATE_25 = TextSettings("longest", True, 25)

TEXT_SETTINGS = {
    "pretrain": _TRUNCATE_25,
    "ta": _TRUNCATE_25,
    # The official call passes max_length=30 here without truncation, which has no effect.
    "retrieval_train": _LONGEST,
    "retrieval_eval": TextSettings("max_length", True, 30),
    "grounding_train": _LONGEST,
    "grounding_eval": _LONGEST,
    "vqa_question_train": _TRUNCATE_25,
    "vqa_answer": _LONGEST,
    "vqa_question_eval": _LONGEST,
    "vqa_answer_list": _LONGEST,
    "nlvr": _LONGEST,
    "ve": _LONGEST,
}


def pad_to_multiple(batch: TextBatch, multiple: int, pad_id: int = 0) -> TextBatch:
    """Right-pad ids with `pad_id` and the mask with 0 so the length is a multiple of `multiple`."""
    length = batch.input_ids.shape[1]
    extra = -length % multiple
    if extra == 0:
        return batch
    rows = batch.input_ids.shape[0]
    ids = torch.cat([batch.input_ids, batch.input_ids.new_full((rows, extra), pad_id)], dim=1)
    mask = torch.cat([batch.attention_mask, batch.attention_mask.new_zeros((rows, extra))], dim=1)
    return TextBatch(ids, mask)


def tokenize(tokenizer, texts, settings: TextSettings, pad_to_multiple_of: Optional[int] = None) -> TextBatch:
    """Tokenise a list of strings with one call site's settings into a TextBatch."""
    max_length = settings.max_length if settings.truncation or settings.padding == "max_length" else None
    out = tokenizer(
        list(texts),
        padding=settings.padding,
        truncation=settings.truncation,
        max_length=max_length,
        return_tensors="pt",
    )
    batch = TextBatch(out.input_ids.long(), out.attention_mask.long())
    if pad_to_multiple_of and settings.padding == "longest":
        batch = pad_to_multiple(batch, pad_to_multiple_of, getattr(tokenizer, "pad_token_id", 0) or 0)
    return batch


def _with_length(settings: TextSettings, max_length: Optional[int]) -> TextSettings:
    """A truncating call site cut at `max_length` instead of its own length (None: unchanged)."""
    if max_length is not None and settings.truncation:
        return replace(settings, max_length=int(max_length))
    return settings


def _static(settings: TextSettings, fixed_length: bool) -> TextSettings:
    """With `fixed_length`, a truncating call site pads to its max_length instead of the batch's longest."""
    if fixed_length and settings.truncation and settings.max_length:
        return replace(settings, padding="max_length")
    return settings


class TextCollator:
    """Collate tuples, tokenising the string columns at `text_positions` and default-collating the others."""

    def __init__(
        self,
        tokenizer,
        padding: str = "longest",
        max_length: Optional[int] = None,
        truncation: bool = False,
        text_positions=(1,),
        pad_to_multiple_of: Optional[int] = None,
    ):
        """Store the tokenizer and the call site's settings."""
        self.tokenizer = tokenizer
        self.settings = TextSettings(padding, truncation, max_length)
        self.text_positions = tuple(text_positions)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, batch) -> tuple:
        """Turn a list of item tuples into one batch tuple."""
        columns = list(zip(*batch))
        return tuple(
            tokenize(self.tokenizer, column, self.settings, self.pad_to_multiple_of)
            if position in self.text_positions
            else default_collate(list(column))
            for position, column in enumerate(columns)
        )


class VQACollator:
    """VQA training collate: images stacked, questions tokenised, answers and weights flattened, counts n."""

    def __init__(self, tokenizer, pad_to_multiple_of: Optional[int] = None, fixed_length: bool = False,
                 max_length: Optional[int] = None):
        """Store the tokenizer; questions truncate at 25 tokens (or `max_length`), answers are never truncated."""
        self.tokenizer = tokenizer
        self.pad_to_multiple_of = pad_to_multiple_of
        self.question_settings = _static(_with_length(TEXT_SETTINGS["vqa_question_train"], max_length), fixed_length)

    def __call__(self, batch) -> tuple:
        """Return (image, question TextBatch, answer TextBatch, weights FloatTensor, n list[int])."""
        images, questions, answers, weights = zip(*batch)
        flat_answers = [answer for item in answers for answer in item]
        flat_weights = [float(weight) for item in weights for weight in item]
        return (
            torch.stack(images, dim=0),
            tokenize(self.tokenizer, questions, self.question_settings, self.pad_to_multiple_of),
            tokenize(self.tokenizer, flat_answers, TEXT_SETTINGS["vqa_answer"], self.pad_to_multiple_of),
            torch.tensor(flat_weights, dtype=torch.float32),
            [len(item) for item in answers],
        )


# (task, train?) -> (text settings name, text column positions); None settings: no text column.
_COLLATE_LAYOUT = {
    ("pretrain", True): ("pretrain", (1,)),
    ("pretrain", False): ("pretrain", (1,)),
    ("re", True): ("retrieval_train", (1,)),
    ("re", False): (None, ()),
    ("vqa", False): ("vqa_question_eval", (1,)),
    ("nlvr", True): ("nlvr", (2,)),
    ("nlvr", False): ("nlvr", (2,)),
    ("ve", True): ("ve", (1,)),
    ("ve", False): ("ve", (1,)),
    ("grounding", True): ("grounding_train", (1,)),
    ("grounding", False): ("grounding_eval", (1,)),
}
COLLATE_TASKS = ("pretrain", "re", "vqa", "nlvr", "ve", "grounding")


def text_length_of(config) -> Optional[int]:
    """The token length a config fixes for every text, or None (ALBEF's call-site lengths): VLMo's `max_text_len`
    (`max_text_len_of_initckpt` for stage 2, `task: textmlm`; VLMo.md 3.1)."""
    if config.get("max_text_len") is None:
        return None
    if config.get("task") == "textmlm":
        return int(config.get("max_text_len_of_initckpt", config["max_text_len"]))
    return int(config["max_text_len"])


def static_shape_options(config) -> dict:
    """build_collate_fn keywords of a config: few text shapes under `compile: true` (truncated call sites exactly
    their length, the others bucketed to multiples of 8, never truncated), and the config's own text length where
    it fixes one (text_length_of: the truncated call sites cut there instead of at 25); {} for ALBEF without compile."""
    options = {"fixed_length": True, "pad_to_multiple_of": 8} if config.get("compile", False) else {}
    length = text_length_of(config)
    if length is not None:
        options["max_length"] = length
    return options


def build_collate_fn(
    task: str,
    tokenizer,
    train: bool = True,
    pad_to_multiple_of: Optional[int] = None,
    fixed_length: bool = False,
    max_length: Optional[int] = None,
):
    """Return the picklable collate function of `task` (pretrain/TA, re, vqa, nlvr, ve, grounding) and split;
    `max_length` replaces the length of the truncating call sites (pretraining, VQA training questions)."""
    if task == "vqa" and train:
        return VQACollator(tokenizer, pad_to_multiple_of, fixed_length, max_length)
    if (task, bool(train)) not in _COLLATE_LAYOUT:
        raise ValueError(f"build_collate_fn (dataset/collate.py): unknown task {task!r}; use one of {COLLATE_TASKS}")
    settings_name, positions = _COLLATE_LAYOUT[(task, bool(train))]
    settings = _static(_with_length(TEXT_SETTINGS[settings_name], max_length), fixed_length) if settings_name \
        else _LONGEST
    return TextCollator(
        tokenizer,
        padding=settings.padding,
        max_length=settings.max_length,
        truncation=settings.truncation,
        text_positions=positions,
        pad_to_multiple_of=pad_to_multiple_of,
    )
