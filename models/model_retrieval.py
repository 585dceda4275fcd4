"""ALBEF image-text retrieval model (COCO, Flickr30K), also the grounding training model (spec 6.1, 6.5).

Training form (831 keys at full size): online encoders, momentum copies and the queues, including `idx_queue`.
Inference form (`with_momentum=False`, 415 keys): online encoders only, the layout of the released raw files
`mscoco.pth`, `flickr30k.pth` and `refcoco.pth` (spec 7.4, 7.5).
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import losses
from .model_pretrain import ALBEF as PretrainALBEF
from .model_pretrain import apply_speed_options, build_text_config, load_text_weights, share_image_tokens
from .momentum import MomentumMixin
from .vit import build_vit
from .xbert import BertModel


class ALBEF(MomentumMixin, nn.Module):
    """Retrieval model; `forward(image, text, alpha, idx)` -> (loss_ita, loss_itm)."""

    model_pairs = (('visual_encoder', 'visual_encoder_m'), ('vision_proj', 'vision_proj_m'),
                   ('text_encoder', 'text_encoder_m'), ('text_proj', 'text_proj_m'))

    # Stages that do not depend on the text-encoder wrapper are the pretraining model's, not a second copy.
    encode_image = PretrainALBEF.encode_image
    momentum_keys = PretrainALBEF.momentum_keys
    itm_forward = PretrainALBEF.itm_forward

    def __init__(self, text_encoder=None, tokenizer=None, config=None, with_momentum=True):
        super().__init__()
        self.tokenizer = tokenizer
        self.distill = bool(config.get('distill', True))
        self.vectorized_negatives = bool(config.get('vectorized_negatives', False))
        embed_dim, vision_width = config['embed_dim'], config['vision_width']

        self.visual_encoder = build_vit(config)
        bert_config = build_text_config(config)
        self.text_encoder = BertModel(bert_config)
        load_text_weights(self.text_encoder, text_encoder)
        text_width = bert_config.hidden_size
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.temp = nn.Parameter(torch.ones([]) * config['temp'])
        self.itm_head = nn.Linear(text_width, 2)

        self.with_momentum = with_momentum
        if with_momentum:
            self.visual_encoder_m = copy.deepcopy(self.visual_encoder)
            self.vision_proj_m = nn.Linear(vision_width, embed_dim)
            self.text_encoder_m = BertModel(bert_config)
            self.text_proj_m = nn.Linear(text_width, embed_dim)
            self.momentum = config['momentum']
            self.copy_params()
            self.init_queues(embed_dim, config['queue_size'], with_idx=True)
        self.itm_fallbacks = 0
        apply_speed_options(self, config)

    # ---- named stages ---------------------------------------------------------------------------------------
    def encode_text(self, text, encoder, proj):
        """Text-mode tokens (layers [0, fusion_layer)) and the normalised projected CLS feature."""
        embeds = encoder(text.input_ids, attention_mask=text.attention_mask, return_dict=True,
                         mode='text').last_hidden_state
        return embeds, F.normalize(proj(embeds[:, 0, :]).float(), dim=-1)

    def fuse(self, text_embeds, text_mask, image_embeds):
        """Fusion layers on text states cross-attending to image tokens; returns the multimodal CLS."""
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text_encoder(encoder_embeds=text_embeds, attention_mask=text_mask,
                                encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                                return_dict=True, mode='fusion')
        return out.last_hidden_state[:, 0, :]

    def itm_score(self, text_embeds, text_mask, image_embeds):
        """The ITM "match" logit of each (text, image) row, as used for re-ranking."""
        return self.itm_head(self.fuse(text_embeds, text_mask, image_embeds))[:, 1]

    def sample_negatives(self, sim_i2t, sim_t2i, idx=None):
        """Hard negatives with every same-image pair excluded; an image per text, then a text per image."""
        bs = sim_i2t.shape[0]
        with torch.no_grad():
            # the official +1e-4 inside the softmax is kept although it cancels out
            w_i2t = losses.negative_weights(sim_i2t[:, :bs], idx, eps=1e-4)
            w_t2i = losses.negative_weights(sim_t2i[:, :bs], idx, eps=1e-4)
            w_t2i, bad_t2i = losses.sanitize_negative_weights(w_t2i, idx)
            w_i2t, bad_i2t = losses.sanitize_negative_weights(w_i2t, idx)
            self.itm_fallbacks += bad_t2i + bad_i2t
            neg_image = losses.sample_negatives(w_t2i, self.vectorized_negatives)
            neg_text = losses.sample_negatives(w_i2t, self.vectorized_negatives)
        return neg_image, neg_text

    def itc_targets(self, idx, sim_i2t_m, sim_t2i_m, alpha):
        """Targets sharing mass over every caption of the same image (batch and queue), optionally distilled."""
        idx_all = torch.cat([idx.view(1, -1), self.idx_queue.clone().detach()], dim=1)
        hard = losses.idx_targets(idx, idx_all)
        if not self.distill:
            return hard, hard
        return losses.distill_targets(sim_i2t_m, hard, alpha), losses.distill_targets(sim_t2i_m, hard, alpha)

    def forward(self, image, text, alpha=0, idx=None):
        if not self.with_momentum:
            raise RuntimeError('this retrieval model was built in the inference form (no momentum encoders or '
                               'queues) and cannot train; build it with with_momentum=True')
        if idx is None:
            raise ValueError('the retrieval model needs idx (the image index of every caption) to train')
        # the official fine-tuning never clamps temp (spec 14 #9)
        image_embeds, image_feat = self.encode_image(image, self.visual_encoder, self.vision_proj)
        text_embeds, text_feat = self.encode_text(text, self.text_encoder, self.text_proj)

        with torch.no_grad():
            _, image_feat_m, text_feat_m, image_feat_all, text_feat_all = self.momentum_keys(image, text)
            sim_i2t_m = image_feat_m @ text_feat_all / self.temp
            sim_t2i_m = text_feat_m @ image_feat_all / self.temp
            targets_i2t, targets_t2i = self.itc_targets(idx, sim_i2t_m, sim_t2i_m, alpha)

        sim_i2t = image_feat @ text_feat_all / self.temp
        sim_t2i = text_feat @ image_feat_all / self.temp
        loss_ita = losses.itc_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i)
        self._dequeue_and_enqueue(image_feat_m, text_feat_m, idx)

        loss_itm = self.itm_forward(share_image_tokens(self, image_embeds), text_embeds, text.attention_mask, sim_i2t,
                                    sim_t2i, idx)
        return loss_ita, loss_itm
