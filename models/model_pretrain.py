"""ALBEF pretraining model: ITC with momentum distillation and queues, ITM with hard negatives, MLM (spec 5)."""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import losses
from .checkpoint import load_bert_pretrained, load_deit
from .momentum import MomentumMixin
from .vit import build_vit
from .xbert import BertForMaskedLM, SharedImageTokens, make_bert_config


def build_text_config(config):
    """The BertConfig named by `bert_config` (JSON path or inline mapping)."""
    return make_bert_config(config['bert_config'])


def load_text_weights(module, text_encoder):
    """Load local BERT weights into `module` unless `text_encoder` is None/'none' (random init)."""
    if text_encoder and str(text_encoder).lower() != 'none':
        load_bert_pretrained(module, text_encoder)


# `mode` presets (docs/PERFORMANCE.md). 'fused' None = fused AdamW exactly when every parameter is on CUDA.
SPEED_MODES = {
    'reference': {'attention': 'explicit', 'ema': 'reference', 'vectorized_negatives': False, 'fused': False,
                  'kv_reuse': False},
    'fast': {'attention': 'sdpa', 'ema': 'foreach', 'vectorized_negatives': True, 'fused': None, 'kv_reuse': True},
}
# Without `mode`: the per-key defaults this repository always had (SDPA, loop EMA, row-by-row draws, fused on CUDA),
# so runs and parity tests without the key are unchanged.
_UNSET_MODE = {'attention': 'sdpa', 'ema': 'reference', 'vectorized_negatives': False, 'fused': None,
               'kv_reuse': False}


def resolve_speed_mode(config):
    """The attention/ema/vectorized_negatives/fused switches: the `mode` preset, overridden by keys set explicitly."""
    mode = config.get('mode')
    if mode is not None and mode not in SPEED_MODES:
        raise ValueError(f"mode must be 'reference' or 'fast', got {mode!r}")
    options = dict(SPEED_MODES[mode] if mode else _UNSET_MODE)
    for key in ('attention', 'ema', 'vectorized_negatives', 'kv_reuse'):
        if config.get(key) is not None:
            options[key] = config[key]
    return options


def apply_speed_options(model, config):
    """Attention and EMA implementation, momentum-teacher mode and activation checkpointing from the config."""
    from .xbert import set_attention_impl, set_grad_checkpointing
    options = resolve_speed_mode(config)
    set_attention_impl(model, options['attention'])
    model.ema_impl = options['ema']
    if hasattr(model, 'vectorized_negatives'):
        model.vectorized_negatives = bool(options['vectorized_negatives'])
    # compiled layers keep plain tensors as inputs (a cache object would only add guards and graph breaks)
    model.kv_reuse = bool(options['kv_reuse']) and not config.get('compile', False)
    model.momentum_eval_mode = bool(config.get('momentum_eval_mode', False))
    model.queue_wraparound = bool(config.get('queue_wraparound', False))
    if config.get('grad_checkpointing', False):
        set_grad_checkpointing(model, True)
    if config.get('compile', False):
        compile_layers(model)


def compile_layers(model):
    """torch.compile every ViT block and BERT layer in place (state-dict keys unchanged); returns how many.

    Layer granularity keeps the EMA update, all-gather/enqueue, queue pointer and multinomial sampling outside the
    compiled regions (spec 16.5), and the online and momentum copies share compiled code.
    """
    from .vit import Block
    from .xbert import BertLayer
    layers = [m for m in model.modules() if isinstance(m, (Block, BertLayer))]
    for layer in layers:
        layer.compile(dynamic=False)
    return len(layers)


def share_image_tokens(model, image_embeds):
    """`image_embeds` as SharedImageTokens (per-layer cross-attention K/V projected once for the ITM positive, ITM
    negative and MLM passes, spec 16.6) when the model's `kv_reuse` switch is on; otherwise unchanged."""
    if not getattr(model, 'kv_reuse', False):
        return image_embeds
    bert = getattr(model.text_encoder, 'bert', model.text_encoder)
    return SharedImageTokens(image_embeds).project(bert)


class ALBEF(MomentumMixin, nn.Module):
    """The official pretraining model; `forward(image, text, alpha)` -> (loss_mlm, loss_ita, loss_itm)."""

    model_pairs = (('visual_encoder', 'visual_encoder_m'), ('vision_proj', 'vision_proj_m'),
                   ('text_encoder', 'text_encoder_m'), ('text_proj', 'text_proj_m'))

    def __init__(self, text_encoder=None, tokenizer=None, config=None, init_deit=True):
        super().__init__()
        self.tokenizer = tokenizer
        self.mlm_probability = config['mlm_probability']
        embed_dim, vision_width = config['embed_dim'], config['vision_width']
        self.mlm_softmax_dim = config.get('mlm_distill_softmax_dim', 'vocab')
        self.vectorized_negatives = bool(config.get('vectorized_negatives', False))

        self.visual_encoder = build_vit(config)
        if init_deit:
            load_deit(self.visual_encoder, init_deit if isinstance(init_deit, str) else config.get('deit_checkpoint'))
        bert_config = build_text_config(config)
        self.text_encoder = BertForMaskedLM(bert_config)
        load_text_weights(self.text_encoder, text_encoder)
        text_width = bert_config.hidden_size
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.temp = nn.Parameter(torch.ones([]) * config['temp'])
        self.itm_head = nn.Linear(text_width, 2)

        self.visual_encoder_m = copy.deepcopy(self.visual_encoder)
        self.vision_proj_m = nn.Linear(vision_width, embed_dim)
        self.text_encoder_m = BertForMaskedLM(bert_config)
        self.text_proj_m = nn.Linear(text_width, embed_dim)
        self.momentum = config['momentum']
        self.copy_params()
        self.init_queues(embed_dim, config['queue_size'])
        self.itm_fallbacks = 0
        apply_speed_options(self, config)

    # ---- named stages ---------------------------------------------------------------------------------------
    def encode_image(self, image, encoder, proj):
        """Image tokens and the normalised projected CLS feature."""
        embeds = encoder(image)
        return embeds, F.normalize(proj(embeds[:, 0, :]).float(), dim=-1)

    def encode_text(self, text, encoder, proj):
        """Text-mode tokens (layers [0, fusion_layer)) and the normalised projected CLS feature."""
        embeds = encoder.bert(text.input_ids, attention_mask=text.attention_mask, return_dict=True,
                              mode='text').last_hidden_state
        return embeds, F.normalize(proj(embeds[:, 0, :]).float(), dim=-1)

    def fuse(self, text_embeds, text_mask, image_embeds):
        """Fusion layers on text states cross-attending to image tokens; returns the multimodal CLS."""
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text_encoder.bert(encoder_embeds=text_embeds, attention_mask=text_mask,
                                     encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                                     return_dict=True, mode='fusion')
        return out.last_hidden_state[:, 0, :]

    @torch.no_grad()
    def momentum_keys(self, image, text):
        """EMA update, then momentum image tokens and features, and the ITC keys [features^T | queue] (spec 5.2.4)."""
        self._momentum_update()
        image_embeds_m, image_feat_m = self.encode_image(image, self.visual_encoder_m, self.vision_proj_m)
        _, text_feat_m = self.encode_text(text, self.text_encoder_m, self.text_proj_m)
        image_feat_all = torch.cat([image_feat_m.t(), self.image_queue.clone().detach()], dim=1)
        text_feat_all = torch.cat([text_feat_m.t(), self.text_queue.clone().detach()], dim=1)
        return image_embeds_m, image_feat_m, text_feat_m, image_feat_all, text_feat_all

    def forward(self, image, text, alpha=0):
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_embeds, image_feat = self.encode_image(image, self.visual_encoder, self.vision_proj)
        text_embeds, text_feat = self.encode_text(text, self.text_encoder, self.text_proj)

        with torch.no_grad():
            image_embeds_m, image_feat_m, text_feat_m, image_feat_all, text_feat_all = self.momentum_keys(image, text)
            sim_i2t_m = image_feat_m @ text_feat_all / self.temp
            sim_t2i_m = text_feat_m @ image_feat_all / self.temp
            hard = losses.identity_targets(sim_i2t_m)
            targets_i2t = losses.distill_targets(sim_i2t_m, hard, alpha)
            targets_t2i = losses.distill_targets(sim_t2i_m, hard, alpha)

        sim_i2t = image_feat @ text_feat_all / self.temp
        sim_t2i = text_feat @ image_feat_all / self.temp
        loss_ita = losses.itc_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i)
        self._dequeue_and_enqueue(image_feat_m, text_feat_m)

        image_tokens = share_image_tokens(self, image_embeds)
        loss_itm = self.itm_forward(image_tokens, text_embeds, text.attention_mask, sim_i2t, sim_t2i)
        loss_mlm = self.mlm_forward(text, image_tokens, image_embeds_m, alpha)
        return loss_mlm, loss_ita, loss_itm

    def sample_negatives(self, sim_i2t, sim_t2i, idx=None):
        """Hard negatives: an image index per text, then a text index per image (spec 5.2 step 7)."""
        bs = sim_i2t.shape[0]
        with torch.no_grad():
            w_i2t = losses.negative_weights(sim_i2t[:, :bs], idx)
            w_t2i = losses.negative_weights(sim_t2i[:, :bs], idx)
            w_t2i, bad_t2i = losses.sanitize_negative_weights(w_t2i, idx)
            w_i2t, bad_i2t = losses.sanitize_negative_weights(w_i2t, idx)
            self.itm_fallbacks += bad_t2i + bad_i2t
            neg_image = losses.sample_negatives(w_t2i, self.vectorized_negatives)
            neg_text = losses.sample_negatives(w_i2t, self.vectorized_negatives)
        return neg_image, neg_text

    def itm_forward(self, image_embeds, text_embeds, text_mask, sim_i2t, sim_t2i, idx=None):
        """ITM loss over [positives; (text, hard image); (hard text, image)]."""
        bs = image_embeds.shape[0]
        pos_cls = self.fuse(text_embeds, text_mask, image_embeds)
        neg_image, neg_text = self.sample_negatives(sim_i2t, sim_t2i, idx)
        text_embeds_all = torch.cat([text_embeds, text_embeds[neg_text]], dim=0)
        text_atts_all = torch.cat([text_mask, text_mask[neg_text]], dim=0)
        if isinstance(image_embeds, SharedImageTokens):  # the same rows, gathered from the shared K/V
            image_embeds_all = image_embeds.take(torch.cat([neg_image, torch.arange(bs, device=neg_image.device)]))
        else:
            image_embeds_all = torch.cat([image_embeds[neg_image], image_embeds], dim=0)
        neg_cls = self.fuse(text_embeds_all, text_atts_all, image_embeds_all)
        logits = self.itm_head(torch.cat([pos_cls, neg_cls], dim=0))
        return losses.itm_loss(logits, bs)

    def mlm_forward(self, text, image_embeds, image_embeds_m, alpha):
        """Masked LM on the image-conditioned encoder with momentum soft labels."""
        input_ids = text.input_ids.clone()
        labels = input_ids.clone()
        tok = self.tokenizer
        input_ids, labels = losses.mask_tokens(input_ids, self.text_encoder.config.vocab_size, self.mlm_probability,
                                               tok.pad_token_id, tok.cls_token_id, tok.mask_token_id, labels)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        with torch.no_grad():
            hidden_m = self.text_encoder_m.bert(input_ids, attention_mask=text.attention_mask,
                                                encoder_hidden_states=image_embeds_m, encoder_attention_mask=image_atts,
                                                return_dict=True).last_hidden_state
            if self.mlm_softmax_dim == 'vocab':  # soft labels are only read at the masked positions
                logits_m = self.text_encoder_m.logits_at(hidden_m, labels != -100)
            else:
                logits_m = self.text_encoder_m.cls(hidden_m)
        out = self.text_encoder(input_ids, attention_mask=text.attention_mask, encoder_hidden_states=image_embeds,
                                encoder_attention_mask=image_atts, return_dict=True, labels=labels,
                                soft_labels=F.softmax(logits_m.float(), dim=-1), alpha=alpha,
                                softmax_dim=self.mlm_softmax_dim)
        return out.loss
