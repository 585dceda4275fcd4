"""SIMLA NLVR2 model (SIMLA.md section 7.4): ALBEF's NLVR2 model (models/model_nlvr.py) with the release's encoder.

The release builds it on ALBEF's BERT class (token-type table present) with the depth and split given in the config
(18 layers, `fusion_layer: 0`), so every layer cross-attends, layer l to image l % 2. Cross-attention keys/values are
shared within the pairs (6, 7), (8, 9) ... (16, 17): layers 0-5 keep their own (they come from the pretrained shared
layers 0-5), the pairs are the duplicated layers 6-11 (models/checkpoint rules, SIMLA.md section 9).
"""
from ..model_nlvr import ALBEF as AlbefNLVR
from .base import SimlaMixin, simla_model_config


def shared_kv_pairs(num_layers):
    """(first, second) layer pairs whose cross-attention K/V are one set of Parameters: with L = 18, the 6 layers
    kept from the pretrained stream (L / 3), then pairs of the duplicated ones."""
    kept = num_layers // 3
    return [(layer, layer + 1) for layer in range(kept, num_layers - 1, 2)]


def share_pair_cross_attention(bert):
    """Layer `first` uses the cross-attention key/value Parameters of layer `second` (both state-dict keys stay)."""
    layers = bert.encoder.layer
    for first, second in shared_kv_pairs(len(layers)):
        source, target = layers[second].crossattention.self, layers[first].crossattention.self
        for name in ('key', 'value'):
            getattr(target, name).weight = getattr(source, name).weight
            getattr(target, name).bias = getattr(source, name).bias


class PairEncoderMixin:
    """The release's 18-layer pair encoder for NLVR2 and its text-assignment pretraining."""

    def after_text_weights(self, encoder):
        share_pair_cross_attention(encoder)


class SIMLA(PairEncoderMixin, SimlaMixin, AlbefNLVR):
    """NLVR2; `forward(cat([image0, image1]), text, targets, alpha, train)` -> loss, or logits [B, 2]."""

    def __init__(self, config=None, text_encoder=None, tokenizer=None):
        super().__init__(text_encoder=text_encoder, tokenizer=tokenizer, config=simla_model_config(config))
        self.zero_mask_tokens()
