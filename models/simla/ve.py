"""SIMLA SNLI-VE model: ALBEF's (models/model_ve.py) on the shared-stream BERT, every layer cross-attending to the
image (SIMLA.md section 7.3)."""
from ..model_ve import ALBEF as AlbefVE
from .base import SimlaMixin, simla_model_config


class SIMLA(SimlaMixin, AlbefVE):
    """SNLI-VE; `forward(image, text, targets, alpha, train)` -> loss, or logits [B, 3] when not training."""

    def __init__(self, config=None, text_encoder=None, tokenizer=None):
        super().__init__(text_encoder=text_encoder, tokenizer=tokenizer, config=simla_model_config(config))
        self.zero_mask_tokens()
