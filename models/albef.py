"""The base every ALBEF task model is built on: the shared construction and the shared stages.

Construction (`AlbefBase.__init__`), in the official registration order, which is the state-dict order:
the ViT `visual_encoder` (optionally from a DeiT file), the BERT `text_encoder` (optionally from local weights),
then, each behind a switch, `vision_proj` / `text_proj` / `temp` and `itm_head`, then the task's own modules
(`add_task_modules`), then the momentum copies of `model_pairs` and the ITC queues, and last the speed switches
(models/speed.py). A task model passes its switches and adds only what is specific to it.

The text encoder is a `BertModel` (keys `text_encoder.*`) or, for pretraining, a `BertForMaskedLM` that wraps one
(keys `text_encoder.bert.*`); `bert_of` / `text_bert` give the `BertModel` either way.
"""
import copy
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import losses
from .checkpoint import load_bert_pretrained, load_deit
from .momentum import MomentumMixin
from .speed import apply_speed_options
from .vit import build_vit
from .xbert import BertModel, SharedImageTokens, bert_of, make_bert_config


def build_text_config(config):
    """The BertConfig named by `bert_config` (JSON path or inline mapping)."""
    return make_bert_config(config['bert_config'])


def load_text_weights(module, weights):
    """Load local BERT weights into `module` unless `weights` is None or 'none' (random initialisation)."""
    if weights and str(weights).lower() != 'none':
        load_bert_pretrained(module, weights)


def image_mask(image_embeds):
    """All-ones attention mask over the image tokens [B, N]."""
    return torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)


class ItcOutput(NamedTuple):
    """What `AlbefBase.itc_forward` computed: the ITC loss and what the ITM and MLM passes reuse."""
    loss: torch.Tensor
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    image_embeds_m: torch.Tensor
    sim_i2t: torch.Tensor
    sim_t2i: torch.Tensor


class AlbefBase(MomentumMixin, nn.Module):
    """Shared construction and stages of the ALBEF task models (see the module docstring)."""

    model_pairs = (('visual_encoder', 'visual_encoder_m'), ('vision_proj', 'vision_proj_m'),
                   ('text_encoder', 'text_encoder_m'), ('text_proj', 'text_proj_m'))
    text_class = BertModel      # the text encoder's class; pretraining: BertForMaskedLM
    copy_vit = True             # momentum ViT: a deep copy of the online one (True) or built again (False)
    negative_eps = 0.0          # added inside the hard-negative softmax (retrieval: the official 1e-4)
    vectorized_negatives = False

    def __init__(self, config, text_encoder=None, tokenizer=None, *, init_deit=False, projections=True,
                 itm_head=True, momentum=True, queues=True, queue_idx=False, **task_args):
        """`text_encoder`: local BERT weights (or None); `init_deit`: load the ViT from a DeiT file (a path, or True
        for the config's `deit_checkpoint`); `projections`: vision_proj, text_proj and temp; `itm_head`: the 2-way
        ITM head; `momentum`: momentum copies of `model_pairs`; `queues` (with `momentum`): the ITC queues, with an
        idx queue when `queue_idx`; `task_args` go to `add_task_modules`."""
        super().__init__()
        self.tokenizer = tokenizer
        bert_config = self.text_config(config)
        width = bert_config.hidden_size

        self.visual_encoder = build_vit(config)
        if init_deit:
            load_deit(self.visual_encoder, init_deit if isinstance(init_deit, str) else config.get('deit_checkpoint'))
        self.text_encoder = self.text_class(bert_config)
        load_text_weights(self.text_encoder, text_encoder)
        self.after_text_weights(self.text_encoder)
        if projections:
            self.vision_proj = nn.Linear(config['vision_width'], config['embed_dim'])
            self.text_proj = nn.Linear(width, config['embed_dim'])
            self.temp = nn.Parameter(torch.ones([]) * config.get('temp', 0.07))
        if itm_head:
            self.itm_head = nn.Linear(width, 2)
        self.add_task_modules(config, bert_config, **task_args)

        if momentum:
            for online_name, momentum_name in self.model_pairs:
                setattr(self, momentum_name, self.momentum_copy(online_name, config))
            self.momentum = config.get('momentum', 0.995)  # 0.995: the official value (hard-coded in VQA)
            self.copy_params()
            if queues:
                self.init_queues(config['embed_dim'], config['queue_size'], with_idx=queue_idx)
        apply_speed_options(self, config)

    # ---- construction hooks ----------------------------------------------------------------------------------
    def text_config(self, config):
        """The BertConfig of the text encoder: the config's `bert_config`."""
        return build_text_config(config)

    def after_text_weights(self, encoder):
        """Run on the text encoder (and its momentum copy) once it holds its initial weights (NLVR2 ties the
        cross-attention keys/values of layer pairs here)."""

    def add_task_modules(self, config, bert_config, **task_args):
        """Register the task's own modules (heads, decoder) after the shared ones."""
        if task_args:
            raise TypeError(f'{type(self).__name__} takes no task arguments, got {sorted(task_args)}')

    def momentum_copy(self, name, config):
        """A new module shaped like the online module `name`; `copy_params` then gives it the online values.

        A new module draws its initial values from torch's RNG like the online one did, so a seeded construction
        keeps its draws; a deep copy (`copy_vit`) draws nothing.
        """
        online = getattr(self, name)
        if name == 'visual_encoder':
            return copy.deepcopy(online) if self.copy_vit else build_vit(config)
        if isinstance(online, nn.Linear):
            return nn.Linear(online.in_features, online.out_features)
        if hasattr(online, 'config'):  # a BERT: the text encoder or the VQA answer decoder
            module = type(online)(online.config)
            if name == 'text_encoder':
                self.after_text_weights(module)
            return module
        raise TypeError(f'{type(self).__name__}: no rule to build the momentum copy of {name!r}; override '
                        f'momentum_copy')

    # ---- shared stages -----------------------------------------------------------------------------------------
    @property
    def text_bert(self):
        """The online text encoder's BertModel (`text_encoder` itself, or `text_encoder.bert` in pretraining)."""
        return bert_of(self.text_encoder)

    def encode_image(self, image, encoder, proj):
        """Image tokens and the normalised projected CLS feature."""
        embeds = encoder(image)
        return embeds, F.normalize(proj(embeds[:, 0, :]).float(), dim=-1)

    def encode_text(self, text, encoder, proj):
        """Text-mode tokens (layers [0, fusion_layer)) and the normalised projected CLS feature."""
        embeds = bert_of(encoder)(text.input_ids, attention_mask=text.attention_mask, return_dict=True,
                                  mode='text').last_hidden_state
        return embeds, F.normalize(proj(embeds[:, 0, :]).float(), dim=-1)

    def fuse(self, text_embeds, text_mask, image_embeds):
        """Fusion layers on text states cross-attending to image tokens; returns the multimodal CLS."""
        out = self.text_bert(encoder_embeds=text_embeds, attention_mask=text_mask, encoder_hidden_states=image_embeds,
                             encoder_attention_mask=image_mask(image_embeds), return_dict=True, mode='fusion')
        return out.last_hidden_state[:, 0, :]

    @staticmethod
    def encode_multimodal(encoder, input_ids, attention_mask, image_states, image_masks=None):
        """Every layer of `encoder` (text, then fusion cross-attending to `image_states`, a tensor or a list of
        them): the states [B, L, D]."""
        if image_masks is None:
            image_masks = image_mask(image_states)
        return bert_of(encoder)(input_ids, attention_mask=attention_mask, encoder_hidden_states=image_states,
                                encoder_attention_mask=image_masks, return_dict=True).last_hidden_state

    def itm_score(self, text_embeds, text_mask, image_embeds):
        """The ITM "match" logit of each (text, image) row, as used for re-ranking."""
        return self.itm_head(self.fuse(text_embeds, text_mask, image_embeds))[:, 1]

    @torch.no_grad()
    def momentum_keys(self, image, text):
        """EMA update, then the momentum image tokens and features and the ITC keys [features^T | queue]."""
        self._momentum_update()
        image_embeds_m, image_feat_m = self.encode_image(image, self.visual_encoder_m, self.vision_proj_m)
        _, text_feat_m = self.encode_text(text, self.text_encoder_m, self.text_proj_m)
        image_feat_all = torch.cat([image_feat_m.t(), self.image_queue.clone().detach()], dim=1)
        text_feat_all = torch.cat([text_feat_m.t(), self.text_queue.clone().detach()], dim=1)
        return image_embeds_m, image_feat_m, text_feat_m, image_feat_all, text_feat_all

    def itc_targets(self, sim_i2t_m, sim_t2i_m, alpha, idx=None):
        """ITC targets: the identity over the batch (zero on the queue), distilled with the momentum similarities."""
        hard = losses.identity_targets(sim_i2t_m)
        return losses.distill_targets(sim_i2t_m, hard, alpha), losses.distill_targets(sim_t2i_m, hard, alpha)

    def itc_forward(self, image, text, alpha, idx=None):
        """Online and momentum encodings, the ITC loss against [batch | queue], then the enqueue of the momentum
        features (and `idx`)."""
        image_embeds, image_feat = self.encode_image(image, self.visual_encoder, self.vision_proj)
        text_embeds, text_feat = self.encode_text(text, self.text_encoder, self.text_proj)
        with torch.no_grad():
            image_embeds_m, image_feat_m, text_feat_m, image_feat_all, text_feat_all = self.momentum_keys(image, text)
            sim_i2t_m = image_feat_m @ text_feat_all / self.temp
            sim_t2i_m = text_feat_m @ image_feat_all / self.temp
            targets_i2t, targets_t2i = self.itc_targets(sim_i2t_m, sim_t2i_m, alpha, idx)
        sim_i2t = image_feat @ text_feat_all / self.temp
        sim_t2i = text_feat @ image_feat_all / self.temp
        loss_ita = losses.itc_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i)
        self.before_enqueue(image_feat, text_feat, image_feat_m, text_feat_m, alpha)
        self._dequeue_and_enqueue(image_feat_m, text_feat_m, idx)
        return ItcOutput(loss_ita, image_embeds, text_embeds, image_embeds_m, sim_i2t, sim_t2i)

    def before_enqueue(self, image_feat, text_feat, image_feat_m, text_feat_m, alpha):
        """Called by `itc_forward` with the online and momentum unit features while the queues still hold their
        state before this step's enqueue; ALBEF does nothing here (a family's extra objectives, e.g. CODIS's
        codebook terms, read the features and queues here)."""

    def sample_negatives(self, sim_i2t, sim_t2i, idx=None):
        """Hard negatives (same-image pairs excluded when `idx` is given): an image per text, then a text per image."""
        bs = sim_i2t.shape[0]
        with torch.no_grad():
            w_i2t = losses.negative_weights(sim_i2t[:, :bs], idx, eps=self.negative_eps)
            w_t2i = losses.negative_weights(sim_t2i[:, :bs], idx, eps=self.negative_eps)
            w_t2i, _ = losses.sanitize_negative_weights(w_t2i, idx)
            w_i2t, _ = losses.sanitize_negative_weights(w_i2t, idx)
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
