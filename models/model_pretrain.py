"""ALBEF pretraining model: ITC with momentum distillation and queues, ITM with hard negatives, MLM (paper,
section 3)."""
import torch
import torch.nn.functional as F

from . import losses
from .albef import AlbefBase, image_mask
from .speed import share_image_tokens
from .xbert import BertForMaskedLM


class ALBEF(AlbefBase):
    """The official pretraining model; `forward(image, text, alpha)` -> (loss_mlm, loss_ita, loss_itm)."""

    text_class = BertForMaskedLM

    def __init__(self, text_encoder=None, tokenizer=None, config=None, init_deit=True):
        super().__init__(config, text_encoder, tokenizer, init_deit=init_deit)
        self.mlm_probability = config['mlm_probability']
        self.mlm_softmax_dim = config.get('mlm_distill_softmax_dim', 'vocab')

    def forward(self, image, text, alpha=0):
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        itc = self.itc_forward(image, text, alpha)
        image_tokens = share_image_tokens(self, itc.image_embeds)
        loss_itm = self.itm_forward(image_tokens, itc.text_embeds, text.attention_mask, itc.sim_i2t, itc.sim_t2i)
        loss_mlm = self.mlm_forward(text, image_tokens, itc.image_embeds_m, alpha)
        return loss_mlm, itc.loss, loss_itm

    def mlm_forward(self, text, image_embeds, image_embeds_m, alpha):
        """Masked LM on the image-conditioned encoder with momentum soft labels."""
        input_ids = text.input_ids.clone()
        labels = input_ids.clone()
        tok = self.tokenizer
        input_ids, labels = losses.mask_tokens(input_ids, self.text_encoder.config.vocab_size, self.mlm_probability,
                                               tok.pad_token_id, tok.cls_token_id, tok.mask_token_id, labels)
        image_atts = image_mask(image_embeds)
        soft_labels = None
        with torch.no_grad():
            # the momentum pass runs even at alpha 0: its dropout masks are part of the run's random stream
            hidden_m = self.encode_multimodal(self.text_encoder_m, input_ids, text.attention_mask, image_embeds_m,
                                              image_atts)
            if not losses.distillation_off(alpha):  # at alpha 0 the soft labels would be multiplied by 0
                if self.mlm_softmax_dim == 'vocab':  # soft labels are only read at the masked positions
                    logits_m = self.text_encoder_m.logits_at(hidden_m, labels != -100)
                else:
                    logits_m = self.text_encoder_m.cls(hidden_m)
                soft_labels = F.softmax(logits_m.float(), dim=-1)
        out = self.text_encoder(input_ids, attention_mask=text.attention_mask, encoder_hidden_states=image_embeds,
                                encoder_attention_mask=image_atts, return_dict=True, labels=labels,
                                soft_labels=soft_labels, alpha=alpha, softmax_dim=self.mlm_softmax_dim)
        return out.loss
