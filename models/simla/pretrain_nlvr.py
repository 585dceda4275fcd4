"""SIMLA text-assignment pretraining for NLVR2 (SIMLA.md section 7.4): ALBEF's TA model
(models/model_pretrain_nlvr.py) on the release's 18-layer pair encoder (models/simla/nlvr.py)."""
from ..model_pretrain_nlvr import ALBEF as AlbefTA
from .base import SimlaMixin, simla_model_config
from .nlvr import PairEncoderMixin


class SIMLA(PairEncoderMixin, SimlaMixin, AlbefTA):
    """TA pretraining; `forward(image, text)` -> cross-entropy of the 3-way assignment."""

    def __init__(self, config=None, text_encoder=None, tokenizer=None):
        super().__init__(text_encoder=text_encoder, tokenizer=tokenizer, config=simla_model_config(config))
        self.zero_mask_tokens()
