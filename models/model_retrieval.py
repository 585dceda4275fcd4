"""ALBEF image-text retrieval model (COCO, Flickr30K), also the grounding training model.

Training form (831 keys at full size): online encoders, momentum copies and the queues, including `idx_queue`.
Inference form (`with_momentum=False`, 415 keys): online encoders only, the layout of the released raw files
`mscoco.pth`, `flickr30k.pth` and `refcoco.pth`.
"""
import torch

from . import losses
from .albef import AlbefBase
from .speed import share_image_tokens


class ALBEF(AlbefBase):
    """Retrieval model; `forward(image, text, alpha, idx)` -> (loss_ita, loss_itm)."""

    negative_eps = 1e-4  # the official +1e-4 inside the softmax is kept although it cancels out (docs/QUIRKS.md)

    def __init__(self, text_encoder=None, tokenizer=None, config=None, with_momentum=True):
        super().__init__(config, text_encoder, tokenizer, momentum=with_momentum, queue_idx=True)
        self.with_momentum = with_momentum
        self.distill = bool(config.get('distill', True))

    def itc_targets(self, sim_i2t_m, sim_t2i_m, alpha, idx=None):
        """Targets sharing mass over every caption of the same image (batch and queue), optionally distilled."""
        idx_all = torch.cat([idx.view(1, -1), self.idx_queue.clone().detach()], dim=1)
        hard = losses.idx_targets(idx, idx_all)
        if not self.distill:
            return hard, hard
        return losses.distill_targets(sim_i2t_m, hard, alpha), losses.distill_targets(sim_t2i_m, hard, alpha)

    def check_can_train(self, idx):
        """Refuse to train the inference form, or without the image index of every caption."""
        if not self.with_momentum:
            raise RuntimeError('this retrieval model was built in the inference form (no momentum encoders or '
                               'queues) and cannot train; build it with with_momentum=True')
        if idx is None:
            raise ValueError('the retrieval model needs idx (the image index of every caption) to train')

    def forward(self, image, text, alpha=0, idx=None):
        self.check_can_train(idx)
        # the official fine-tuning never clamps temp (docs/QUIRKS.md)
        itc = self.itc_forward(image, text, alpha, idx)
        loss_itm = self.itm_forward(share_image_tokens(self, itc.image_embeds), itc.text_embeds, text.attention_mask,
                                    itc.sim_i2t, itc.sim_t2i, idx)
        return itc.loss, loss_itm
