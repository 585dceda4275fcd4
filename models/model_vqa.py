"""ALBEF for VQA: a question encoder, a 6-layer answer decoder and answer-list ranking (paper, section 5).

The question encoder is the full multimodal BERT (text layers, then fusion layers cross-attending to the image).
The answer decoder is a causal BERT of `num_hidden_layers - fusion_layer` layers whose every layer cross-attends to
the question states; it is trained on `answer [SEP]` with per-answer weights and, at test time, ranks a fixed
answer list (`rank_answer`). With `distill`, momentum copies of all three give the decoder soft targets.
"""
import copy

import torch
import torch.nn.functional as F

from . import losses
from .albef import AlbefBase, load_text_weights
from .xbert import BertLMHeadModel


def build_decoder_config(bert_config):
    """The answer-decoder config: the encoder's fusion depth, every layer with cross-attention (fusion_layer 0)."""
    decoder_config = copy.deepcopy(bert_config)
    decoder_config.num_hidden_layers = bert_config.num_hidden_layers - bert_config.fusion_layer
    decoder_config.fusion_layer = 0
    return decoder_config


def repeat_rows(tensor, counts):
    """Row b repeated counts[b] times, consecutively (counts: list of ints or a LongTensor)."""
    counts = torch.as_tensor(counts, dtype=torch.long, device=tensor.device)
    return torch.repeat_interleave(tensor, counts, dim=0)


def decoder_distill_on(config):
    """Whether the decoder's distillation receives alpha ('off' = the pre-2022-07 official code, docs/QUIRKS.md)."""
    flag = config.get('vqa_decoder_distill', 'on')
    return flag is True or flag == 'on'


class ALBEF(AlbefBase):
    """The official VQA model; train: `forward(...) -> loss`, eval: `forward(..., train=False) -> (ids, probs)`."""

    model_pairs = (('visual_encoder', 'visual_encoder_m'), ('text_encoder', 'text_encoder_m'),
                   ('text_decoder', 'text_decoder_m'))
    copy_vit = False  # the momentum ViT is built again like the online one, not deep-copied

    def __init__(self, text_encoder=None, text_decoder=None, tokenizer=None, config=None):
        distill = bool(config.get('distill', True))
        super().__init__(config, text_encoder, tokenizer, projections=False, itm_head=False, momentum=distill,
                         queues=False, text_decoder=text_decoder)
        self.distill = distill
        self.decoder_alpha_on = decoder_distill_on(config)
        self.first_token_once = bool(config.get('vqa_first_token_once', False))

    def add_task_modules(self, config, bert_config, text_decoder=None):
        """The answer decoder `text_decoder`, from local BERT weights `text_decoder` (or None)."""
        self.text_decoder = BertLMHeadModel(build_decoder_config(bert_config))
        load_text_weights(self.text_decoder, text_decoder)

    @property
    def pad_token_id(self):
        """The padding id (from the tokenizer, else the BERT config)."""
        pad = getattr(self.tokenizer, 'pad_token_id', None)
        return self.text_encoder.config.pad_token_id if pad is None else pad

    # ---- named stages ---------------------------------------------------------------------------------------
    def encode_question(self, image, question, visual_encoder, text_encoder):
        """Multimodal question states [B, Lq, D]: the question cross-attending to the image tokens."""
        return self.encode_multimodal(text_encoder, question.input_ids, question.attention_mask, visual_encoder(image))

    def answer_targets(self, answer_ids):
        """Decoder labels: the answer ids with padding ignored (-100)."""
        return answer_ids.masked_fill(answer_ids == self.pad_token_id, -100)

    def forward(self, image, question, answer=None, alpha=0, k=None, weights=None, train=True):
        if train:
            return self.answer_loss(image, question, answer, alpha, k, weights)
        question_states = self.encode_question(image, question, self.visual_encoder, self.text_encoder)
        return self.rank_answer(question_states, question.attention_mask, answer.input_ids, answer.attention_mask, k)

    def answer_loss(self, image, question, answer, alpha, k, weights):
        """Weighted answer-decoder loss, summed over answers and divided by the number of questions."""
        question_states = repeat_rows(self.encode_question(image, question, self.visual_encoder, self.text_encoder), k)
        question_atts = repeat_rows(question.attention_mask, k)
        targets = self.answer_targets(answer.input_ids)
        soft_labels, distill_alpha = None, 0
        if self.distill:
            with torch.no_grad():
                self._momentum_update()
                states_m = repeat_rows(self.encode_question(image, question, self.visual_encoder_m,
                                                            self.text_encoder_m), k)
                logits_m = self.text_decoder_m(answer.input_ids, attention_mask=answer.attention_mask,
                                               encoder_hidden_states=states_m, encoder_attention_mask=question_atts,
                                               return_logits=True)
                soft_labels = F.softmax(logits_m.float(), dim=-1)
            distill_alpha = alpha if self.decoder_alpha_on else 0
        per_answer = self.text_decoder(answer.input_ids, attention_mask=answer.attention_mask,
                                       encoder_hidden_states=question_states, encoder_attention_mask=question_atts,
                                       labels=targets, return_dict=True, soft_labels=soft_labels,
                                       alpha=distill_alpha, reduction='none').loss
        return losses.vqa_loss(per_answer, weights, image.size(0))

    def rank_answer(self, question_states, question_atts, answer_ids, answer_atts, k):
        """Top-k answers of the list per question, re-ranked by full-sequence log-probability (docs/QUIRKS.md).

        Returns (topk_ids [B, k] indices into the answer list, topk_probs [B, k]) sorted by probability.
        """
        num_ques = question_states.size(0)
        k = min(int(k), answer_ids.size(0))
        start_ids = answer_ids[0, 0].repeat(num_ques, 1)  # the [CLS] start token
        start_logits = self.text_decoder(start_ids, encoder_hidden_states=question_states,
                                         encoder_attention_mask=question_atts, return_dict=True).logits[:, 0, :]
        prob_first_token = F.softmax(start_logits.float(), dim=1).index_select(dim=1, index=answer_ids[:, 1])
        topk_probs, topk_ids = prob_first_token.topk(k, dim=1)

        flat_ids = topk_ids.reshape(-1)
        input_ids = answer_ids.index_select(0, flat_ids)
        input_atts = answer_atts.index_select(0, flat_ids)
        answer_nll = self.text_decoder(input_ids, attention_mask=input_atts,
                                       encoder_hidden_states=repeat_rows(question_states, [k] * num_ques),
                                       encoder_attention_mask=repeat_rows(question_atts, [k] * num_ques),
                                       labels=self.answer_targets(input_ids), return_dict=True,
                                       reduction='none').loss
        scores = losses.answer_sequence_scores(topk_probs, answer_nll.view(num_ques, k), self.first_token_once)
        probs, rerank = F.softmax(scores, dim=-1).topk(k, dim=1)
        return torch.gather(topk_ids, 1, rerank), probs
