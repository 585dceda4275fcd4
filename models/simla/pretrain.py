"""SIMLA pretraining model: ALBEF's ITC, ITM and MLM with momentum distillation and queues on one shared 12-layer
BERT, plus cross-modal masked image modelling (MIM) and pseudo-keyword prediction (PSL) (SIMLA paper, section 2;
SIMLA.md sections 5.1-5.3).

State-dict layout (972 keys at full size) and momentum pairs in the release's order: ViT (with `mask_token`),
vision_proj, BERT + MLM head, text_proj, `mim_head`, `concept_head`; `mim_head`/`mim_head_m` are registered before the
momentum ViT and `concept_head`/`concept_head_m` last, as the release does.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import losses
from ..albef import image_mask
from ..model_pretrain import ALBEF as AlbefPretrain
from ..speed import share_image_tokens
from .base import SimlaMixin, linear_like, simla_model_config

SPECIAL_IDS = {'cls': 'cls_token_id', 'pad': 'pad_token_id', 'sep': 'sep_token_id', 'mask': 'mask_token_id'}


def mim_options(config):
    """The `mim:` block with its defaults (SIMLA.md section 10.2); `mim_vocab_size` is the release config's name."""
    block = dict(config.get('mim') or {})
    block.setdefault('enabled', True)
    block.setdefault('vocab_size', config.get('mim_vocab_size', 8192))
    block.setdefault('text_context', 'embeddings')
    if block['text_context'] not in ('embeddings', 'text_mode'):
        raise ValueError(f"mim.text_context must be 'embeddings' or 'text_mode', got {block['text_context']!r}")
    return block


def psl_options(config):
    """The `psl:` block with its defaults (SIMLA.md section 10.2)."""
    block = dict(config.get('psl') or {})
    block.setdefault('enabled', True)
    block.setdefault('attn_layer', -1)
    block.setdefault('selection', 'head_vote')
    block.setdefault('topk_per_head', 4)
    block.setdefault('num_keywords', 5 if block['selection'] == 'head_vote' else 4)
    block.setdefault('drop_ids', ['cls'])
    return block


class SIMLA(SimlaMixin, AlbefPretrain):
    """`forward(image, text, visual_token_ids, masked_visual_token_pos, masked_visual_tok_labels, alpha)` ->
    (loss_mlm, loss_ita, loss_itm, loss_mim, loss_psl), each scaled by its `loss_weights` entry; a switched-off
    objective (`mim.enabled` / `psl.enabled` false) returns None in its place."""

    model_pairs = AlbefPretrain.model_pairs + (('mim_head', 'mim_head_m'), ('concept_head', 'concept_head_m'))

    def __init__(self, config=None, text_encoder=None, tokenizer=None, init_deit=None):
        self.mim = mim_options(config)
        self.psl = psl_options(config)
        if init_deit is None:  # a DeiT file only when the config names one (random ViT otherwise, no download)
            init_deit = config.get('deit_checkpoint') or False
        super().__init__(text_encoder=text_encoder, tokenizer=tokenizer, config=simla_model_config(config),
                         init_deit=init_deit)
        self.zero_mask_tokens()
        for encoder in (self.text_encoder, self.text_encoder_m):
            encoder.distill_softmax_dim = self.mlm_softmax_dim
        self.loss_weights = {'itc': 1.0, 'itm': 1.0, 'mlm': 1.0, 'mim': 1.0, 'psl': 1.0}
        self.loss_weights.update(config.get('loss_weights') or {})
        vocab = self.concept_head.out_features
        self.psl_drop_ids = [self.special_id(name, vocab) for name in self.psl['drop_ids']]

    # ---- construction hooks ----------------------------------------------------------------------------------
    def add_task_modules(self, config, bert_config):
        """`mim_head` (hidden -> visual vocabulary) and the slot of `mim_head_m` (filled by the momentum copy)."""
        self.mim_head = nn.Linear(bert_config.hidden_size, int(self.mim['vocab_size']))
        self.mim_head_m = linear_like(self.mim_head)

    def momentum_copy(self, name, config):
        """Momentum heads are new Linears; `concept_head` (embed_dim -> text vocabulary) is registered right before
        its copy, after the other momentum modules (the release order)."""
        if name == 'mim_head':
            return linear_like(self.mim_head)
        if name == 'concept_head':
            vocab = getattr(self.tokenizer, 'vocab_size', None) or self.text_encoder.config.vocab_size
            self.concept_head = nn.Linear(config['embed_dim'], vocab)
            return linear_like(self.concept_head)
        return super().momentum_copy(name, config)

    def special_id(self, name, vocab):
        """Token id of a `psl.drop_ids` entry: 'cls' / 'pad' / 'sep' / 'mask' (from the tokenizer) or an int."""
        if isinstance(name, int):
            return name
        if name not in SPECIAL_IDS:
            raise ValueError(f'psl.drop_ids entries are cls, pad, sep, mask or token ids, got {name!r}')
        token = getattr(self.tokenizer, SPECIAL_IDS[name], None)
        if token is None:
            defaults = {'cls': 101, 'pad': 0, 'sep': 102, 'mask': 103}  # bert-base-uncased
            token = defaults[name]
        if not 0 <= token < vocab:
            raise ValueError(f'psl.drop_ids: the {name} id {token} is outside the concept head vocabulary {vocab}')
        return token

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward(self, image, text, visual_token_ids=None, masked_visual_token_pos=None, masked_visual_tok_labels=None,
                alpha=0):
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        itc = self.itc_forward(image, text, alpha)
        image_tokens = share_image_tokens(self, itc.image_embeds)
        # ITM: positive and negative passes run the whole shared stream from the token ids (SimlaMixin.fuse)
        loss_itm = self.itm_forward(image_tokens, text.input_ids, text.attention_mask, itc.sim_i2t, itc.sim_t2i)
        loss_mlm = self.mlm_forward(text, image_tokens, itc.image_embeds_m, alpha)
        loss_mim = None
        if self.mim['enabled']:
            if masked_visual_token_pos is None or masked_visual_tok_labels is None:
                raise ValueError('mim.enabled needs masked_visual_token_pos and masked_visual_tok_labels (the data '
                                 'pipeline gives them only when MIM is on)')
            loss_mim = self.mim_forward(image, text, masked_visual_token_pos.bool(), masked_visual_tok_labels, alpha)
        loss_psl = None
        if self.psl['enabled']:
            loss_psl = self.psl_forward(text, itc.image_embeds, itc.image_embeds_m, alpha)
        return tuple(self.weighted(name, loss) for name, loss in (('mlm', loss_mlm), ('itc', itc.loss),
                                                                   ('itm', loss_itm), ('mim', loss_mim),
                                                                   ('psl', loss_psl)))

    @staticmethod
    @torch.no_grad()
    def mim_targets(visual_tokenizer, tok_view, patch_mask):
        """The MIM inputs of `forward` from a batch's tokenizer views [B, 3, h, w] and patch masks [B, G, G] or
        [B, G*G], as the release's training loop makes them: (visual_token_ids [B, P], masked_visual_token_pos
        [B, P] bool, masked_visual_tok_labels [M]), row-major. The tokenizer runs frozen, under no-grad."""
        codes = visual_tokenizer.encode(tok_view).flatten(1)
        mask = patch_mask.flatten(1).bool().to(codes.device)
        if mask.shape != codes.shape:
            raise ValueError(f'patch masks {tuple(mask.shape)} and visual codes {tuple(codes.shape)} differ: the mask '
                             f'grid must be the tokenizer grid (image_res / patch size)')
        return codes, mask, codes[mask]

    def weighted(self, name, loss):
        """`loss` times its `loss_weights` entry (untouched at the default 1.0)."""
        weight = float(self.loss_weights[name])
        return loss if loss is None or weight == 1.0 else weight * loss

    def caption_context(self, text):
        """The MIM caption context: the online embedding-layer output of the ids (release), or with
        `mim.text_context: text_mode` the online text-mode states (an extension)."""
        if self.mim['text_context'] == 'text_mode':
            return self.text_bert(text.input_ids, attention_mask=text.attention_mask, return_dict=True,
                                  mode='text').last_hidden_state
        return self.text_bert.embeddings(text.input_ids)

    def image_query_logits(self, image, mask, text, context, visual_encoder, bert, head):
        """MIM logits [M, V_img] at the masked patches: the masked image's ViT tokens query the caption context
        through every layer of `bert` (BERT position embeddings added), CLS row dropped, `head` applied."""
        tokens = visual_encoder(image, mask=mask)
        states = bert(inputs_embeds=tokens, attention_mask=image_mask(tokens), encoder_hidden_states=context,
                      encoder_attention_mask=text.attention_mask, return_dict=True).last_hidden_state
        return head(states[:, 1:][mask])

    def mim_forward(self, image, text, mask, labels, alpha):
        """Cross-modal MIM (SIMLA.md section 5.2 step 8): soft targets from the momentum branch, CE + distillation
        over the masked patches."""
        with torch.no_grad():
            logits_m = self.image_query_logits(image, mask, text, self.caption_context(text), self.visual_encoder_m,
                                               self.text_encoder_m.bert, self.mim_head_m)
            soft = F.softmax(logits_m.float(), dim=-1)
        logits = self.image_query_logits(image, mask, text, self.caption_context(text), self.visual_encoder,
                                         self.text_bert, self.mim_head)
        self.mim_monitoring = dict(zip(('mim_accuracy', 'mim_majority'), losses.mim_accuracy(logits, labels)))
        return losses.mim_loss(logits, labels, soft, alpha)

    def psl_forward(self, text, image_embeds, image_embeds_m, alpha):
        """Pseudo-keyword prediction (SIMLA.md section 5.2 step 9): keywords from the momentum BERT's last-layer
        [CLS] attention over the caption (multimodal pass on the online image tokens), predicted by `concept_head`
        from the image ITC embedding alone, distilled with the momentum head."""
        layer = int(self.psl['attn_layer']) % self.text_encoder_m.config.num_hidden_layers
        with torch.no_grad():
            image_tokens = image_embeds.detach()
            out = self.text_encoder_m.bert(text.input_ids, attention_mask=text.attention_mask,
                                           encoder_hidden_states=image_tokens,
                                           encoder_attention_mask=image_mask(image_tokens), return_dict=True,
                                           mode='multimodal', output_attentions=[layer])
            cls_rows = out.attentions[layer][:, :, 0, :]
            hard = losses.psl_targets(cls_rows, text.input_ids, self.concept_head.out_features, self.psl_drop_ids,
                                      self.psl['selection'], int(self.psl['topk_per_head']),
                                      int(self.psl['num_keywords']), text.attention_mask)
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0, :]).float(), dim=-1)
            soft = torch.sigmoid(self.concept_head_m(image_feat_m).float())
        # the online ITC image embedding (as itc_forward computed it; the gradient reaches the ViT and vision_proj)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)
        return losses.psl_loss(self.concept_head(image_feat), hard, soft, alpha)


LOSS_NAMES = ('loss_mlm', 'loss_ita', 'loss_itm', 'loss_mim', 'loss_psl')  # the order of SIMLA.forward's tuple


def make_pretrain_step(config, device):
    """Pretrain.py's step for SIMLA (registered as the pretraining TaskSpec's `make_step`): with MIM on, the batch's
    image column is (image, tokenizer view, patch mask) (dataset/simla_views.py); the frozen visual tokenizer of
    `mim.tokenizer`, built once here and never part of the model's state dict, turns the view and mask into the MIM
    inputs under no-grad, then the model's forward gives the five losses, named as train_steps.jsonl logs them
    (a switched-off objective is left out), with the MIM accuracy on the masked patches (`mim_accuracy`) beside the
    share of the batch's most frequent code among them (`mim_majority`, what always answering it would score)."""
    from .visual_tokenizer import build_visual_tokenizer
    visual_tokenizer = None
    if mim_options(config)['enabled']:
        visual_tokenizer = build_visual_tokenizer(config)
        if hasattr(visual_tokenizer, 'to'):
            visual_tokenizer = visual_tokenizer.to(device)

    def step(model, batch, alpha):
        image, text = batch
        if visual_tokenizer is None:
            out = model(image, text, alpha=alpha)
        else:
            image, tok_view, patch_mask = image
            ids, positions, labels = SIMLA.mim_targets(visual_tokenizer, tok_view, patch_mask)
            out = model(image, text, ids, positions, labels, alpha=alpha)
        logged = {name: loss for name, loss in zip(LOSS_NAMES, out) if loss is not None}
        if 'loss_mim' in logged:  # masked-patch accuracy beside always answering the batch's most frequent code
            logged.update(getattr(model, 'module', model).mim_monitoring)
        return logged
    return step
