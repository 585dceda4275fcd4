"""NLVR2 model: one sentence, two images, an 18-layer text encoder whose fusion layers alternate between the
images, cross-attention keys/values shared within each pair of layers, and a 2-way head (paper, section 5).

The pair encoder (`PairEncoderMixin`: `pair_text_config`, `share_cross_attention`) is shared with the
text-assignment pretraining model (models/model_pretrain_nlvr.py). The official code hard-codes 18 layers and the pairs (6, 7) ... (16, 17);
here they follow from the BERT config: fusion_layer + 2 * (num_hidden_layers - fusion_layer) layers, pairs
(fusion_layer + 2i, fusion_layer + 2i + 1), which is exactly the official layout for BERT-base.
"""
import copy

import torch

from .albef import build_text_config, image_mask
from .model_ve import ALBEF as ClassificationALBEF


def pair_text_config(config):
    """BertConfig of the pair encoder: the fusion layers doubled (12 -> 18 layers for BERT-base)."""
    bert_config = copy.deepcopy(build_text_config(config))
    fusion, total = bert_config.fusion_layer, bert_config.num_hidden_layers
    bert_config.num_hidden_layers = fusion + 2 * (total - fusion)
    return bert_config


def shared_kv_layer_pairs(bert_config):
    """(image-0 layer, image-1 layer) index pairs whose cross-attention K/V are one set of parameters."""
    fusion, total = bert_config.fusion_layer, bert_config.num_hidden_layers
    return [(layer, layer + 1) for layer in range(fusion, total - 1, 2)]


def share_cross_attention(bert):
    """Make the cross-attention key/value Linear of layer 2i+f use the Parameters of layer 2i+f+1.

    Both state-dict keys remain (the same tensor under two names), as in the official checkpoints.
    """
    layers = bert.encoder.layer
    for first, second in shared_kv_layer_pairs(bert.config):
        source, target = layers[second].crossattention.self, layers[first].crossattention.self
        for name in ('key', 'value'):
            getattr(target, name).weight = getattr(source, name).weight
            getattr(target, name).bias = getattr(source, name).bias


def split_image_pairs(image_embeds, batch_size):
    """[2B, N, D] tokens of [image0 batch; image1 batch] -> ([img0, img1], [mask0, mask1])."""
    if image_embeds.shape[0] != 2 * batch_size:
        raise ValueError(f'NLVR2 takes image = torch.cat([image0, image1]) with 2 x {batch_size} rows for '
                         f'{batch_size} sentences, got {image_embeds.shape[0]} rows')
    states = list(torch.split(image_embeds, batch_size))
    return states, [image_mask(s) for s in states]


class PairEncoderMixin:
    """For an AlbefBase model: the pair text encoder (NLVR2 and its text-assignment pretraining)."""

    def text_config(self, config):
        """The 18-layer pair encoder config."""
        return pair_text_config(config)

    def after_text_weights(self, encoder):
        """Share cross-attention K/V within each layer pair (after BERT weights are in, as the official code)."""
        share_cross_attention(encoder)


class ALBEF(PairEncoderMixin, ClassificationALBEF):
    """NLVR2; `forward(cat([image0, image1]), text, targets, alpha, train)` -> loss, or logits [B, 2] in eval."""

    num_classes = 2

    def image_states(self, image_embeds, batch_size):
        """Two image sequences: fusion layer l attends to image (l - fusion_layer) % 2."""
        return split_image_pairs(image_embeds, batch_size)
