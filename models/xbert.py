"""Our own compact BERT for ALBEF (paper, section 3.1), with the official module names.

Layers `>= fusion_layer` add a cross-attention block whose keys/values read `encoder_hidden_states`
(width `encoder_width`). `mode` selects the layers to run: 'text' (the text encoder), 'fusion' (the
multimodal encoder, fed `encoder_embeds`), 'multi_modal' (all). `encoder_hidden_states` may be a list of
image sequences: layer l then attends to element (l - fusion_layer) % n (the NLVR2 rule).

SIMLA switches (docs/README_simla.md; SIMLA paper, section 2), all off by default so ALBEF is unchanged:
- `use_token_type_embeddings: false` in the BERT config drops the token-type table (SIMLA's shared BERT has none).
- `shared_text_fusion: true` with `fusion_layer: 0`: one stream whose every layer has cross-attention; mode 'text'
  runs all layers with the cross-attention skipped, 'multimodal'/'multi_modal' runs all layers with it.
- `inputs_embeds=` (the image-query pass): given vectors (ViT tokens) get the BERT position embeddings, LayerNorm
  and dropout instead of the word embeddings.
- `output_attentions=` True (every layer run) or layer indices: the post-softmax, pre-dropout self-attention
  probabilities of those layers in `.attentions` (indexed by layer; None where not kept), via the explicit path.

transformers is used only for `BertConfig`; no modelling code is imported from it.
"""
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig

from .attention_capture import AttentionCapture
from .losses import lm_loss, lm_loss_seq_distill, mlm_loss

SELF_MASK_VALUE = -10000.0   # xbert get_extended_attention_mask
CROSS_MASK_VALUE = -1e9      # transformers 4.8.1 invert_attention_mask, fp32 branch


@dataclass
class BertOutput_:
    """Output of every model in this file; fields not computed stay None."""
    last_hidden_state: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None
    attentions: Optional[list] = None


def make_bert_config(spec):
    """BertConfig from a JSON path, a mapping of fields, or a BertConfig (fusion_layer/encoder_width included)."""
    if isinstance(spec, BertConfig):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f'bert_config file {spec} does not exist; point bert_config at '
                                    f'configs/config_bert.json or give the fields inline')
        with open(spec) as f:
            spec = json.load(f)
    fields = dict(spec)
    fields.setdefault('fusion_layer', fields.get('num_hidden_layers', 12) // 2)
    fields.setdefault('encoder_width', fields.get('hidden_size', 768))
    return BertConfig(**fields)


def _activation(name):
    if name in ('gelu', 'gelu_python'):
        return nn.GELU()
    if name == 'relu':
        return nn.ReLU()
    if name in ('gelu_new', 'gelu_pytorch_tanh'):
        return nn.GELU(approximate='tanh')
    raise ValueError(f'unsupported hidden_act {name!r} in the BERT config')


class BertEmbeddings(nn.Module):
    """Word + position (+ token-type, unless `use_token_type_embeddings` is false) embeddings, LayerNorm, dropout.

    `inputs_embeds` replaces the word (and token-type) term by given vectors (SIMLA's image-query pass)."""

    def __init__(self, config):
        super().__init__()
        self.use_token_type = bool(getattr(config, 'use_token_type_embeddings', True))
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        if self.use_token_type:
            self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # persistent: every official checkpoint contains embeddings.position_ids
        self.register_buffer('position_ids', torch.arange(config.max_position_embeddings).expand((1, -1)).clone())

    def forward(self, input_ids=None, inputs_embeds=None):
        if inputs_embeds is not None:
            seq_length = inputs_embeds.size(1)
            if seq_length > self.position_ids.shape[1]:
                raise ValueError(f'{seq_length} input vectors exceed max_position_embeddings '
                                 f'{self.position_ids.shape[1]} of the BERT config (the image-query pass adds BERT '
                                 f'position embeddings to every image token: use a lower image_res)')
            emb = inputs_embeds
        else:
            seq_length = input_ids.size(1)
            emb = self.word_embeddings(input_ids)
            if self.use_token_type:
                emb = emb + self.token_type_embeddings(torch.zeros_like(input_ids))
        position_ids = self.position_ids[:, :seq_length]
        emb = emb + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(emb))


class BertSelfAttention(AttentionCapture, nn.Module):
    """Scaled dot-product attention; K/V from the encoder states for cross-attention."""

    def __init__(self, config, is_cross_attention):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f'hidden_size {config.hidden_size} is not a multiple of num_attention_heads '
                             f'{config.num_attention_heads}')
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        kv_width = config.encoder_width if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.is_cross_attention = is_cross_attention
        self.use_sdpa = True
        self.save_attention = False
        self.init_capture()

    def _heads(self, x):
        return x.view(x.shape[0], x.shape[1], self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, keep_probs=False):
        """Context [B, L, hidden]; with `keep_probs` (explicit path) also the post-softmax, pre-dropout
        probabilities [B, heads, L, N]."""
        source = encoder_hidden_states if self.is_cross_attention else hidden_states
        q = self._heads(self.query(hidden_states))
        if isinstance(source, SharedImageTokens):
            k, v = (self._heads(x) for x in source.key_value(self))
        else:
            k = self._heads(self.key(source))
            v = self._heads(self.value(source))
        capture = self.is_cross_attention and self.save_attention
        probs = None
        if self.use_sdpa and not capture and not keep_probs:
            mask = None if attention_mask is None else attention_mask.to(q.dtype)
            p = self.dropout.p if self.training else 0.0
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = scores.softmax(dim=-1)
            if capture:
                self.attention_map = probs
                probs.register_hook(self.save_attn_gradients)
            context = torch.matmul(self.dropout(probs), v)
        context = context.transpose(1, 2).reshape(hidden_states.shape[0], hidden_states.shape[1], -1)
        if keep_probs:
            return context, probs
        return context


class SharedImageTokens:
    """Image tokens whose cross-attention keys/values are projected once per layer and reused
    (the `kv_reuse` switch, models/speed.py).

    Pass it as `encoder_hidden_states`. In a pretraining step the positive ITM pass, the negative pass (whose second
    half is the same images) and the MLM pass cross-attend to the same image tokens through the same layers, so each
    layer's K/V is computed once (`project`, before the passes, so activation checkpointing never recomputes a shared
    tensor) and `take(index)` selects rows of it for another batch order. Gathering K/V rows equals projecting gathered
    tokens (a row-wise linear map); autograd sums the gradients of all uses into the one projection.
    """

    def __init__(self, states, index=None, cache=None):
        self.states = states
        self.index = index
        self.cache = {} if cache is None else cache

    @property
    def shape(self):
        rows = self.states.shape[0] if self.index is None else self.index.shape[0]
        return torch.Size((rows, *self.states.shape[1:]))

    @property
    def device(self):
        return self.states.device

    def project(self, bert):
        """Compute K/V of every cross-attention layer of `bert` (a BertModel) now; returns self."""
        for layer in bert.encoder.layer:
            if layer.has_cross_attention:
                attention = layer.crossattention.self
                self.cache[attention] = (attention.key(self.states), attention.value(self.states))
        return self

    def take(self, index):
        """The same tokens in the batch order `index` (LongTensor of row indices), sharing the K/V cache."""
        return SharedImageTokens(self.states, index if self.index is None else self.index[index], self.cache)

    def key_value(self, attention):
        """(key, value) [B, N, hidden] of `attention` (a cross-attention BertSelfAttention) for these rows."""
        if attention not in self.cache:
            raise KeyError('SharedImageTokens.project(bert) must run before the fusion passes that use it')
        k, v = self.cache[attention]
        if self.index is not None:
            k, v = k[self.index], v[self.index]
        return k, v


class BertAttention(nn.Module):
    """Self- or cross-attention block."""

    def __init__(self, config, is_cross_attention=False):
        super().__init__()
        self.self = BertSelfAttention(config, is_cross_attention)
        self.output = BertOutput(config, config.hidden_size)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, keep_probs=False):
        if keep_probs:
            context, probs = self.self(hidden_states, attention_mask, encoder_hidden_states, keep_probs=True)
            return self.output(context, hidden_states), probs
        return self.output(self.self(hidden_states, attention_mask, encoder_hidden_states), hidden_states)


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = _activation(config.hidden_act)

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertOutput(nn.Module):
    """Dense (in_width -> hidden), dropout, residual, LayerNorm (post-norm): after the feed-forward (in_width =
    intermediate_size, the default) and after each attention (in_width = hidden_size)."""

    def __init__(self, config, in_width=None):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size if in_width is None else in_width, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertLayer(nn.Module):
    """Self-attention -> (cross-attention if layer_num >= fusion_layer and `cross`) -> feed-forward.

    `cross=False` skips the cross-attention block (the shared-stream 'text' mode); `keep_probs` also returns the
    self-attention probabilities."""

    def __init__(self, config, layer_num):
        super().__init__()
        self.layer_num = layer_num
        self.has_cross_attention = layer_num >= config.fusion_layer
        self.attention = BertAttention(config)
        if self.has_cross_attention:
            self.crossattention = BertAttention(config, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states, attention_mask, encoder_hidden_states=None, encoder_attention_mask=None,
                cross=True, keep_probs=False):
        probs = None
        if keep_probs:
            hidden_states, probs = self.attention(hidden_states, attention_mask, keep_probs=True)
        else:
            hidden_states = self.attention(hidden_states, attention_mask)
        if self.has_cross_attention and cross:
            if encoder_hidden_states is None:
                raise ValueError(f'layer {self.layer_num} has cross-attention and needs encoder_hidden_states')
            hidden_states = self.crossattention(hidden_states, encoder_attention_mask, encoder_hidden_states)
        out = self.output(self.intermediate(hidden_states), hidden_states)
        return (out, probs) if keep_probs else out


class BertEncoder(nn.Module):
    """Stack of BertLayers; runs the layer range selected by `mode`."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.shared_stream = bool(getattr(config, 'shared_text_fusion', False))
        if self.shared_stream and config.fusion_layer != 0:
            raise ValueError(f'shared_text_fusion needs fusion_layer 0 (cross-attention in every layer), got '
                             f'{config.fusion_layer}')
        self.layer = nn.ModuleList([BertLayer(config, i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def layer_range(self, mode):
        """Indices [start, end) of the layers run in `mode` ('multimodal' is another name of 'multi_modal')."""
        fusion, total = self.config.fusion_layer, self.config.num_hidden_layers
        if self.shared_stream:
            ranges = {'text': (0, total), 'multi_modal': (0, total), 'multimodal': (0, total)}
        else:
            ranges = {'text': (0, fusion), 'fusion': (fusion, total), 'multi_modal': (0, total),
                      'multimodal': (0, total)}
        if mode not in ranges:
            raise ValueError(f"mode must be one of {sorted(ranges)}, got {mode!r}"
                             + (' (a shared-stream BERT has no fusion mode)' if self.shared_stream else ''))
        return ranges[mode]

    def forward(self, hidden_states, attention_mask, encoder_hidden_states=None, encoder_attention_mask=None,
                mode='multi_modal', keep_probs=()):
        """Final states; with `keep_probs` (layer indices) also {layer: self-attention probabilities}."""
        start, end = self.layer_range(mode)
        fusion = self.config.fusion_layer
        cross = mode != 'text'  # ALBEF's text range holds no cross-attention layer; the shared stream skips them
        kept = {}
        for i in range(start, end):
            enc, enc_mask = encoder_hidden_states, encoder_attention_mask
            if isinstance(enc, (list, tuple)):
                j = (i - fusion) % len(enc)
                enc, enc_mask = enc[j], enc_mask[j]
            layer = self.layer[i]
            if i in keep_probs:
                hidden_states, kept[i] = layer(hidden_states, attention_mask, enc, enc_mask, cross, True)
            elif self.gradient_checkpointing and self.training:
                hidden_states = checkpoint(layer, hidden_states, attention_mask, enc, enc_mask, cross,
                                           use_reentrant=False)
            else:
                hidden_states = layer(hidden_states, attention_mask, enc, enc_mask, cross)
        if keep_probs:
            return hidden_states, kept
        return hidden_states


def extended_self_mask(attention_mask, is_decoder, dtype):
    """Additive self-attention mask (1 - m) * -10000, causal-multiplied for decoders."""
    if attention_mask.dim() == 3:
        mask = attention_mask[:, None, :, :]
    elif is_decoder:
        L = attention_mask.shape[1]
        causal = torch.tril(torch.ones(L, L, device=attention_mask.device, dtype=attention_mask.dtype))
        mask = causal[None, None, :, :] * attention_mask[:, None, None, :]
    else:
        mask = attention_mask[:, None, None, :]
    return (1.0 - mask.to(dtype)) * SELF_MASK_VALUE


def extended_cross_mask(mask, dtype):
    """Additive cross-attention mask (1 - m) * -1e9; None when every position is visible."""
    if mask is None or bool(mask.all()):
        return None
    mask = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
    return (1.0 - mask.to(dtype)) * CROSS_MASK_VALUE


def _init_bert_weights(module, std):
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


class BertModel(nn.Module):
    """Embeddings + encoder; no pooler (ALBEF never uses one)."""

    def __init__(self, config, add_pooling_layer=False):
        super().__init__()
        if add_pooling_layer:
            raise ValueError('ALBEF checkpoints have no pooler; build BertModel with add_pooling_layer=False')
        self.config = make_bert_config(config)
        self.embeddings = BertEmbeddings(self.config)
        self.encoder = BertEncoder(self.config)
        self.apply(lambda m: _init_bert_weights(m, self.config.initializer_range))

    def forward(self, input_ids=None, attention_mask=None, encoder_embeds=None, encoder_hidden_states=None,
                encoder_attention_mask=None, return_dict=True, is_decoder=False, mode='multi_modal',
                inputs_embeds=None, output_attentions=False, **unused):
        if encoder_embeds is not None:
            hidden = encoder_embeds
        elif inputs_embeds is not None:
            hidden = self.embeddings(inputs_embeds=inputs_embeds)
        elif input_ids is not None:
            hidden = self.embeddings(input_ids)
        else:
            raise ValueError('BertModel needs input_ids, inputs_embeds or encoder_embeds')
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        self_mask = extended_self_mask(attention_mask, is_decoder, hidden.dtype)
        if encoder_hidden_states is not None:
            encoder_attention_mask = self._cross_masks(encoder_hidden_states, encoder_attention_mask, hidden.dtype)
        if not output_attentions:
            hidden = self.encoder(hidden, self_mask, encoder_hidden_states, encoder_attention_mask, mode=mode)
            return BertOutput_(last_hidden_state=hidden)
        n = self.config.num_hidden_layers
        start, end = self.encoder.layer_range(mode)
        layers = range(start, end) if output_attentions is True else [i % n for i in output_attentions]
        hidden, kept = self.encoder(hidden, self_mask, encoder_hidden_states, encoder_attention_mask, mode=mode,
                                    keep_probs=frozenset(layers))
        return BertOutput_(last_hidden_state=hidden, attentions=[kept.get(i) for i in range(n)])

    @staticmethod
    def _cross_masks(states, masks, dtype):
        if isinstance(states, (list, tuple)):
            masks = masks if masks is not None else [None] * len(states)
            return [extended_cross_mask(m, dtype) for m in masks]
        return extended_cross_mask(masks, dtype)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = _activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states):
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class BertLMPredictionHead(nn.Module):
    """Transform + decoder whose weight is tied to the word embeddings and whose bias is `bias`."""

    def __init__(self, config):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, hidden_states):
        return self.decoder(self.transform(hidden_states))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, sequence_output):
        return self.predictions(sequence_output)


class _BertWithHead(nn.Module):
    """`bert` + `cls` with the decoder tied to the word embeddings (transformers 4.8.1 tying, made explicit)."""

    def __init__(self, config):
        super().__init__()
        self.config = make_bert_config(config)
        self.bert = BertModel(self.config)
        self.cls = BertOnlyMLMHead(self.config)
        self.cls.apply(lambda m: _init_bert_weights(m, self.config.initializer_range))
        self.tie_weights()

    def tie_weights(self):
        """Make the decoder weight the word-embedding Parameter and the decoder bias `predictions.bias`."""
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        self.cls.predictions.decoder.bias = self.cls.predictions.bias


class BertForMaskedLM(_BertWithHead):
    """Masked LM with optional soft-label distillation (momentum distillation, paper section 3.3).

    `softmax_dim` of the distillation term: None takes the instance's `distill_softmax_dim` ('vocab'; SIMLA sets
    'seq' to reproduce its release)."""

    distill_softmax_dim = 'vocab'

    def forward(self, input_ids=None, attention_mask=None, encoder_embeds=None, encoder_hidden_states=None,
                encoder_attention_mask=None, labels=None, return_dict=True, return_logits=False, is_decoder=False,
                mode='multi_modal', soft_labels=None, alpha=0, softmax_dim=None, **unused):
        if softmax_dim is None:
            softmax_dim = self.distill_softmax_dim
        out = self.bert(input_ids, attention_mask=attention_mask, encoder_embeds=encoder_embeds,
                        encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                        is_decoder=is_decoder, mode=mode)
        hidden = out.last_hidden_state
        if return_logits or labels is None or softmax_dim != 'vocab':
            logits = self.cls(hidden)
            if return_logits:
                return logits
            loss = None if labels is None else mlm_loss(logits, labels, soft_labels, alpha, softmax_dim)
            return BertOutput_(last_hidden_state=hidden, logits=logits, loss=loss)
        # Only labelled positions enter the loss, so the vocabulary projection runs on those rows alone (the
        # same numbers as the official full-sequence logits, at a fraction of the cost). `.logits` holds those rows.
        selected = labels != -100
        logits = self.cls(hidden[selected])
        if soft_labels is not None and soft_labels.dim() == 3:
            soft_labels = soft_labels[selected]
        loss = mlm_loss(logits, labels[selected], soft_labels, alpha, softmax_dim)
        if logits.shape[0] == 0:
            loss = loss + hidden.sum() * 0.0  # keep the graph connected when nothing was masked
        return BertOutput_(last_hidden_state=hidden, logits=logits, loss=loss)

    def logits_at(self, hidden, positions):
        """MLM logits of the rows of `hidden` selected by the boolean mask `positions`."""
        return self.cls(hidden[positions])


class BertLMHeadModel(_BertWithHead):
    """Causal LM (answer decoder): shifted logits, per-sequence summed loss, soft labels (paper section 3.3).

    `distill_softmax_dim` 'seq' (SIMLA's release) takes the distillation log-softmax over the sequence dimension."""

    distill_softmax_dim = 'vocab'

    def forward(self, input_ids=None, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                labels=None, return_dict=True, return_logits=False, is_decoder=True, reduction='mean',
                mode='multi_modal', soft_labels=None, alpha=0, **unused):
        out = self.bert(input_ids, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                        encoder_attention_mask=encoder_attention_mask, is_decoder=is_decoder, mode=mode)
        logits = self.cls(out.last_hidden_state)
        if return_logits:
            return logits[:, :-1, :].contiguous()
        loss = None
        if labels is not None and soft_labels is not None and self.distill_softmax_dim == 'seq':
            loss = lm_loss_seq_distill(logits[:, :-1, :].contiguous(), labels[:, 1:].contiguous(), reduction,
                                       soft_labels, alpha)
        elif labels is not None:
            loss = lm_loss(logits[:, :-1, :].contiguous(), labels[:, 1:].contiguous(), reduction, soft_labels, alpha)
        return BertOutput_(last_hidden_state=out.last_hidden_state, logits=logits, loss=loss)


def bert_of(encoder):
    """The BertModel of a text encoder: the encoder itself, or the `bert` inside a BertForMaskedLM/BertLMHeadModel."""
    return encoder.bert if isinstance(encoder, _BertWithHead) else encoder


def set_attention_impl(module, impl):
    """Choose 'sdpa' (fused) or 'explicit' (matmul-softmax, the official path) for every attention in `module`."""
    if impl not in ('sdpa', 'explicit'):
        raise ValueError(f"attention implementation must be 'sdpa' or 'explicit', got {impl!r}")
    for m in module.modules():
        if hasattr(m, 'use_sdpa'):
            m.use_sdpa = impl == 'sdpa'


def set_grad_checkpointing(module, enable=True):
    """Turn activation checkpointing on/off for every BERT encoder and ViT inside `module`."""
    for m in module.modules():
        if isinstance(m, BertEncoder):
            m.gradient_checkpointing = enable
        elif hasattr(m, 'set_grad_checkpointing') and m is not module:
            m.set_grad_checkpointing(enable)
