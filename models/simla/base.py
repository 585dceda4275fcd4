"""What every SIMLA task model shares on top of the ALBEF base (models/albef.py)."""
import copy

import torch
import torch.nn as nn

from ..albef import image_mask


def simla_model_config(config):
    """A copy of `config` whose `vit` section carries `mask_token` from `vit_mask_token` (default false: only the
    pretraining model has the mask token, as in every release fine-tuning config)."""
    config = dict(config)
    vit = dict(config.get('vit') or {})
    vit['mask_token'] = bool(config.get('vit_mask_token', False))
    config['vit'] = vit
    return config


def text_encoder_config(config):
    """`bert_config` with the `bert:` block of SIMLA.md section 10.2 applied over it (when the config has one)."""
    block = config.get('bert')
    if not block:
        return config['bert_config']
    from ..xbert import make_bert_config
    bert_config = copy.deepcopy(make_bert_config(config['bert_config']))
    for key, value in block.items():
        setattr(bert_config, key, value)
    return bert_config


class SimlaMixin:
    """For an AlbefBase task model: SIMLA's construction details and its fusion pass.

    SIMLA has no fusion stage fed text-mode states: the ITM positive and negative passes and the re-ranking pass run
    the whole shared stream from token ids, cross-attending to the image tokens in every layer (SIMLA.md section 5.2
    step 6). `fuse` therefore takes token ids where ALBEF's takes text states, so ALBEF's `itm_forward` (negative
    sampling, batch order, labels) is reused unchanged with the ids in place of the states.
    """

    fuses_from_ids = True  # evaluation/rerank.py: the re-ranking pass reads token ids, not text-mode states

    def text_config(self, config):
        """The BertConfig of the text encoder: `bert_config` (plus the optional `bert:` block)."""
        from ..albef import build_text_config
        return build_text_config({'bert_config': text_encoder_config(config)})

    def zero_mask_tokens(self):
        """SIMLA initialises the ViT mask token to zeros (its DeiT load is non-strict, so it stays zero)."""
        with torch.no_grad():
            for name in ('visual_encoder', 'visual_encoder_m'):
                vit = getattr(self, name, None)
                if vit is not None and getattr(vit, 'mask_token', None) is not None:
                    vit.mask_token.zero_()

    def fuse(self, text_ids, text_mask, image_embeds):
        """Multimodal [CLS] of a full shared-stream pass from token ids cross-attending to `image_embeds`."""
        out = self.text_bert(text_ids, attention_mask=text_mask, encoder_hidden_states=image_embeds,
                             encoder_attention_mask=image_mask(image_embeds), return_dict=True, mode='multimodal')
        return out.last_hidden_state[:, 0, :]


def linear_like(module):
    """A new nn.Linear of the same shape (momentum copies get their values from copy_params)."""
    return nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
