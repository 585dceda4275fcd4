"""Text-assignment (TA) pretraining for NLVR2 (paper, section 5; official issue #115).

The 18-layer pair encoder of NLVR2 (fusion layers alternating between two images, cross-attention K/V shared
within each layer pair) learns, for a caption and two images, whether the caption describes image 0 (label 0),
image 1 (label 1) or neither (label 2). Pairs are drawn with torch's RNG in the official order, from
similarities of the projected image [CLS] features at the literal temperature 0.07 (not `temp`, which, like
`text_proj`, is kept for the checkpoint layout but never used; docs/QUIRKS.md).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import losses
from .albef import AlbefBase, image_mask
from .model_nlvr import PairEncoderMixin

TA_TEMPERATURE = 0.07   # hard-coded in the official forward (docs/QUIRKS.md)
TA_LABELS = {'image0': 0, 'image1': 1, 'neither': 2}


def _check_batch(batch_size):
    if batch_size < 3:
        raise ValueError(f'text-assignment pretraining needs at least 3 images per batch and process (two distinct '
                         f'images besides the captioned one), got {batch_size}; raise batch_size')


def ta_pair_weights(image_feat):
    """softmax(f f^T / 0.07) with a zero diagonal, made safe for sampling (finite, >= 2 candidates per row)."""
    _check_batch(image_feat.shape[0])
    weights = losses.negative_weights(image_feat @ image_feat.t() / TA_TEMPERATURE)
    weights, _ = losses.sanitize_negative_weights(weights)
    # "neither" draws two distinct images: a row with a single positive entry would make multinomial raise
    short = (weights > 0).sum(1) < 2
    if bool(short.any()):
        uniform = 1.0 - torch.eye(weights.shape[0], device=weights.device)
        weights = torch.where(short.view(-1, 1), uniform, weights)
    return weights


def sample_ta_pairs(weights):
    """Per caption b: (b, j) label 0 or (j, b) label 1 with probability 1/3 each, else (j1, j2) label 2.

    Same torch RNG calls in the same order as the official loop, so a seeded run draws the official pairs.
    Returns (index of image 0 [B], index of image 1 [B], labels [B]).
    """
    _check_batch(weights.shape[0])
    pairs, labels = [], []
    for b in range(weights.shape[0]):
        if torch.rand(1) > 1 / 3:
            other = torch.multinomial(weights[b], 1).item()
            if torch.rand(1) > 0.5:
                pair, label = (b, other), TA_LABELS['image0']
            else:
                pair, label = (other, b), TA_LABELS['image1']
        else:
            pair, label = torch.multinomial(weights[b], 2).tolist(), TA_LABELS['neither']
        pairs.append(pair)
        labels.append(label)
    pairs = torch.tensor(pairs, dtype=torch.long, device=weights.device)
    return pairs[:, 0], pairs[:, 1], torch.tensor(labels, dtype=torch.long, device=weights.device)


class ALBEF(PairEncoderMixin, AlbefBase):
    """The TA pretraining model; `forward(image, text)` -> cross-entropy of the 3-way assignment."""

    def __init__(self, text_encoder=None, tokenizer=None, config=None):
        super().__init__(config, text_encoder, tokenizer, itm_head=False, momentum=False)

    def add_task_modules(self, config, bert_config):
        """The 3-way assignment head `ta_head`."""
        self.ta_head = nn.Linear(bert_config.hidden_size, len(TA_LABELS))

    # ---- named stages ----------------------------------------------------------------------------------------
    def draw_pairs(self, image_embeds):
        """Image index pairs and labels for every caption (no gradient; uses the torch RNG)."""
        with torch.no_grad():
            image_feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)
            return sample_ta_pairs(ta_pair_weights(image_feat))

    def assign_logits(self, text, image0_embeds, image1_embeds):
        """ta_head logits [B, 3] for captions against (image0, image1) token sequences."""
        states = [image0_embeds, image1_embeds]
        hidden = self.encode_multimodal(self.text_encoder, text.input_ids, text.attention_mask, states,
                                        [image_mask(s) for s in states])
        return self.ta_head(hidden[:, 0, :])

    def forward(self, image, text):
        image_embeds = self.visual_encoder(image)
        first, second, labels = self.draw_pairs(image_embeds)
        logits = self.assign_logits(text, image_embeds[first], image_embeds[second])
        return losses.distill_classification_loss(logits, None, labels, 0.0)
