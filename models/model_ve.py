"""SNLI-VE model (spec 6.4): a 3-way classifier on the multimodal [CLS] with momentum distillation.

`ALBEF` here is also the base of the NLVR2 model (models/model_nlvr.py), which changes only the text encoder
(18 layers, shared cross-attention K/V) and how the image tokens reach it (a list of two images).
"""
import torch
import torch.nn as nn

from . import losses
from .model_pretrain import apply_speed_options, build_text_config, load_text_weights
from .momentum import MomentumMixin
from .vit import build_vit
from .xbert import BertModel

VE_LABELS = {'entailment': 2, 'neutral': 1, 'contradiction': 0}


def classifier_head(width, num_classes):
    """Linear-ReLU-Linear head (state-dict keys `0.*` and `2.*`, as the official nn.Sequential)."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))


def image_mask(image_embeds):
    """All-ones attention mask over the image tokens [B, N]."""
    return torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)


class ALBEF(MomentumMixin, nn.Module):
    """SNLI-VE; `forward(image, text, targets, alpha, train)` -> loss when training, logits [B, 3] otherwise."""

    num_classes = 3
    momentum_pairs = (('visual_encoder', 'visual_encoder_m'), ('text_encoder', 'text_encoder_m'),
                      ('cls_head', 'cls_head_m'))

    def __init__(self, text_encoder=None, tokenizer=None, config=None):
        super().__init__()
        self.tokenizer = tokenizer
        self.distill = bool(config.get('distill', False))
        bert_config = self.text_config(config)
        width = bert_config.hidden_size

        self.visual_encoder = build_vit(config)
        self.text_encoder = self.build_text_encoder(bert_config)
        load_text_weights(self.text_encoder, text_encoder)
        self.after_text_weights(self.text_encoder)
        self.cls_head = classifier_head(width, self.num_classes)

        if self.distill:
            # built like the online modules, then overwritten by copy_params (the official code also loads BERT
            # into them first, which copy_params makes irrelevant)
            self.visual_encoder_m = build_vit(config)
            self.text_encoder_m = self.build_text_encoder(bert_config)
            self.after_text_weights(self.text_encoder_m)
            self.cls_head_m = classifier_head(width, self.num_classes)
            self.model_pairs = self.momentum_pairs
            self.momentum = config.get('momentum', 0.995)
            self.copy_params()
        apply_speed_options(self, config)

    # ---- construction hooks (overridden by the NLVR2 model) --------------------------------------------------
    def text_config(self, config):
        """The BertConfig of the text/fusion encoder."""
        return build_text_config(config)

    def build_text_encoder(self, bert_config):
        """A BertModel without pooler (state-dict prefix `text_encoder.`)."""
        return BertModel(bert_config, add_pooling_layer=False)

    def after_text_weights(self, encoder):
        """Hook run once the encoder holds its initial weights (NLVR2 ties cross-attention K/V here)."""

    def image_states(self, image_embeds, batch_size):
        """Cross-attention states and masks for the text encoder: the image tokens themselves."""
        return image_embeds, image_mask(image_embeds)

    # ---- named stages ----------------------------------------------------------------------------------------
    def classify(self, image, text, visual_encoder, text_encoder, cls_head):
        """Logits of `cls_head` on the multimodal [CLS] (all text layers, multi_modal mode)."""
        image_embeds = visual_encoder(image)
        states, masks = self.image_states(image_embeds, text.input_ids.shape[0])
        out = text_encoder(text.input_ids, attention_mask=text.attention_mask, encoder_hidden_states=states,
                           encoder_attention_mask=masks, return_dict=True)
        return cls_head(out.last_hidden_state[:, 0, :])

    def forward(self, image, text, targets=None, alpha=0, train=True):
        logits = self.classify(image, text, self.visual_encoder, self.text_encoder, self.cls_head)
        if not train:
            return logits
        logits_m = None
        if self.distill:
            with torch.no_grad():
                self._momentum_update()
                logits_m = self.classify(image, text, self.visual_encoder_m, self.text_encoder_m, self.cls_head_m)
        return losses.distill_classification_loss(logits, logits_m, targets, alpha)
