"""SIMLA image-text retrieval model (COCO, Flickr30K), also the grounding training model (SIMLA.md section 7.1).

ALBEF's retrieval model (models/model_retrieval.py) on the shared-stream BERT, with the release's differences: the
ITM passes run from token ids (SimlaMixin.fuse), `temp` is clamped in fine-tuning too (`temp_clamp_finetune`),
distillation always runs, the hard-negative softmax has no +1e-4, and the idx queue is never written
(`enqueue_idx: false`, the release; true enqueues idx as ALBEF does).
"""
from ..model_retrieval import ALBEF as AlbefRetrieval
from ..speed import share_image_tokens
from .base import SimlaMixin, simla_model_config


class SIMLA(SimlaMixin, AlbefRetrieval):
    """Retrieval; `forward(image, text, alpha, idx)` -> (loss_ita, loss_itm)."""

    negative_eps = 0.0

    def __init__(self, config=None, text_encoder=None, tokenizer=None, with_momentum=True):
        super().__init__(text_encoder=text_encoder, tokenizer=tokenizer, config=simla_model_config(config),
                         with_momentum=with_momentum)
        self.zero_mask_tokens()
        self.distill = True  # the release ignores the config's `distill` here
        self.temp_clamp = bool(config.get('temp_clamp_finetune', True))
        self.enqueue_idx = bool(config.get('enqueue_idx', False))

    def _dequeue_and_enqueue(self, image_feat, text_feat, idx=None):
        super()._dequeue_and_enqueue(image_feat, text_feat, idx if self.enqueue_idx else None)

    def forward(self, image, text, alpha=0, idx=None):
        self.check_can_train(idx)
        if self.temp_clamp:
            self.temp.data.clamp_(0.001, 0.5)
        itc = self.itc_forward(image, text, alpha, idx)
        loss_itm = self.itm_forward(share_image_tokens(self, itc.image_embeds), text.input_ids, text.attention_mask,
                                    itc.sim_i2t, itc.sim_t2i, idx)
        return itc.loss, loss_itm
