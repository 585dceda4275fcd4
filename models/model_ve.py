"""SNLI-VE model: a 3-way classifier on the multimodal [CLS] with momentum distillation (paper, section 5).

`ALBEF` here is also the base of the NLVR2 model (models/model_nlvr.py), which changes only the text encoder
(18 layers, shared cross-attention K/V) and how the image tokens reach it (a list of two images).
"""
import torch
import torch.nn as nn

from . import losses
from .albef import AlbefBase, image_mask


def classifier_head(width, num_classes):
    """Linear-ReLU-Linear head (state-dict keys `0.*` and `2.*`, as the official nn.Sequential)."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))


class ALBEF(AlbefBase):
    """SNLI-VE; `forward(image, text, targets, alpha, train)` -> loss when training, logits [B, 3] otherwise."""

    num_classes = 3
    model_pairs = (('visual_encoder', 'visual_encoder_m'), ('text_encoder', 'text_encoder_m'),
                   ('cls_head', 'cls_head_m'))
    copy_vit = False  # the momentum ViT is built again like the online one, not deep-copied

    def __init__(self, text_encoder=None, tokenizer=None, config=None):
        distill = bool(config.get('distill', False))
        # the momentum modules are built like the online ones, then overwritten by copy_params (the official code
        # also loads BERT into them first, which copy_params makes irrelevant)
        super().__init__(config, text_encoder, tokenizer, projections=False, itm_head=False, momentum=distill,
                         queues=False)
        self.distill = distill

    # ---- construction hooks ----------------------------------------------------------------------------------
    def add_task_modules(self, config, bert_config):
        """The classifier head `cls_head`."""
        self.cls_head = classifier_head(bert_config.hidden_size, self.num_classes)

    def momentum_copy(self, name, config):
        """`cls_head_m` is a new classifier head; the rest as in AlbefBase."""
        if name == 'cls_head':
            return classifier_head(self.cls_head[0].in_features, self.num_classes)
        return super().momentum_copy(name, config)

    def image_states(self, image_embeds, batch_size):
        """Cross-attention states and masks for the text encoder: the image tokens themselves."""
        return image_embeds, image_mask(image_embeds)

    # ---- named stages ----------------------------------------------------------------------------------------
    def classify(self, image, text, visual_encoder, text_encoder, cls_head):
        """Logits of `cls_head` on the multimodal [CLS] (all text layers, multi_modal mode)."""
        states, masks = self.image_states(visual_encoder(image), text.input_ids.shape[0])
        hidden = self.encode_multimodal(text_encoder, text.input_ids, text.attention_mask, states, masks)
        return cls_head(hidden[:, 0, :])

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
