"""SIMLA VQA model (SIMLA.md section 7.2): ALBEF's (models/model_vqa.py) with the shared-stream question encoder
and a 6-layer answer decoder whose every layer cross-attends to the question states (no token types). The release
does not pass alpha to the decoder (`vqa_decoder_distill: off`) and its decoder distillation runs the log-softmax
over the sequence (`mlm_distill_softmax_dim: seq`)."""
import copy

from ..albef import load_text_weights
from ..model_vqa import ALBEF as AlbefVQA
from ..xbert import BertLMHeadModel
from .base import SimlaMixin, simla_model_config

DECODER_LAYERS = 6  # initialised from the pretrained shared layers 6..11 (SIMLA.md section 9)


def decoder_config(bert_config, num_layers=DECODER_LAYERS):
    """The answer decoder's config: `num_layers` layers, all with cross-attention, not a shared stream."""
    config = copy.deepcopy(bert_config)
    config.num_hidden_layers = num_layers
    config.fusion_layer = 0
    config.shared_text_fusion = False
    return config


class SIMLA(SimlaMixin, AlbefVQA):
    """VQA; train: `forward(image, question, answer, alpha, k, weights)` -> loss; eval (`train=False`): (ids, probs)."""

    def __init__(self, config=None, text_encoder=None, tokenizer=None, text_decoder=None):
        super().__init__(text_encoder=text_encoder, text_decoder=text_decoder, tokenizer=tokenizer,
                         config=simla_model_config(config))
        self.zero_mask_tokens()
        softmax_dim = config.get('mlm_distill_softmax_dim', 'vocab')
        for decoder in (self.text_decoder, getattr(self, 'text_decoder_m', None)):
            if decoder is not None:
                decoder.distill_softmax_dim = softmax_dim

    def add_task_modules(self, config, bert_config, text_decoder=None):
        """The answer decoder `text_decoder` (from local BERT weights `text_decoder`, or random)."""
        self.text_decoder = BertLMHeadModel(decoder_config(bert_config))
        load_text_weights(self.text_decoder, text_decoder)
