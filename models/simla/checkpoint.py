"""SIMLA's start-from-a-file rules (SIMLA.md section 9): ALBEF's conversions (models/checkpoint.py) applied to the
SIMLA layouts, and the refusal of ALBEF <-> SIMLA mix-ups.

The outcomes (missing / unexpected key sets) are the release scripts': pretrain -> retrieval / grounding 1 / 24,
-> SNLI-VE 8 / 38, -> VQA 0 / 24, -> TA 3 / 656, TA -> NLVR2 632 / 7 at full size (tests/test_simla_checkpoint.py
checks the toy-size sets against the release's). The two differences from ALBEF's rules are parameters, not copies:
the VQA decoder takes the last 6 of the 12 shared layers (ALBEF: the layers from `fusion_layer` on) and the TA rule
keeps layers 0-5 and duplicates 6-11 (ALBEF: duplicates the fusion layers), while SIMLA's task models have
`fusion_layer: 0`.
"""
import re

from .. import checkpoint as ckpt
from .nlvr import shared_kv_pairs

LAYER0 = re.compile(r'^text_encoder(\.bert)?\.encoder\.layer\.0\.')
FAMILY_SIGNS = {
    'simla': 'cross-attention in text-encoder layer 0 or SIMLA heads (mim_head / concept_head)',
    'albef': 'no cross-attention in text-encoder layer 0 (ALBEF\'s text layers)',
}


def checkpoint_family(sd):
    """'simla', 'albef' or None (no text encoder to tell) for a state dict (SIMLA.md section 9, last bullet)."""
    if any(k.startswith(('mim_head.', 'concept_head.')) for k in sd):
        return 'simla'
    layer0 = [k for k in sd if LAYER0.match(k)]
    if not layer0:
        return None
    return 'simla' if any('.crossattention.' in k for k in layer0) else 'albef'


def refuse_other_family(sd, family, path):
    """CheckpointError when `sd` belongs to the other family than the model's `family`."""
    found = checkpoint_family(sd)
    if found is None or found == family:
        return
    name = {'simla': 'SIMLA', 'albef': 'ALBEF'}
    raise ckpt.CheckpointError(
        f'{path} is a {name[found]} checkpoint ({FAMILY_SIGNS[found]}) but the model is {name[family]} (config '
        f'model: {family}). ALBEF and SIMLA checkpoints are not interchangeable: their BERT layers play different '
        f'roles; start a {name[family]} model from a {name[family]} checkpoint, or set model: {found}')


def refusing(family, loader):
    """`loader(model, path, config)` that first refuses a checkpoint of the other family."""
    def load(model, path, config):
        sd = ckpt.read_checkpoint(path)  # read once: the loader takes it in place of the path
        refuse_other_family(sd, family, path)
        return loader(model, sd, config)
    load.__doc__ = loader.__doc__
    return load


def _sd(path_or_sd):
    return ckpt._source(path_or_sd)


def load_pretrain(model, path, config):
    """Continue pretraining (strict)."""
    return ckpt.load_pretrain_checkpoint(model, path)


def load_retrieval(model, path, config):
    """Pretraining or retrieval file -> retrieval / grounding model (ALBEF's rule: pos_embed resized, `bert.` cut)."""
    return ckpt.load_retrieval_checkpoint(model, path, reset_queues=config.get('reset_queues_on_finetune', False))


def convert_to_vqa(sd, model):
    """Pretraining weights -> the VQA layout: the encoder takes all shared layers, the decoder the last ones."""
    sd = ckpt.interpolate_pos_embeds(dict(sd), model)
    if ckpt.is_pretrain_layout(sd) and not ckpt.is_vqa_layout(sd):
        first = model.text_encoder.config.num_hidden_layers - model.text_decoder.config.num_hidden_layers
        ckpt.pretrain_to_vqa(sd, first)
    elif not getattr(model, 'distill', True):
        for key in [k for k in sd if ckpt.is_momentum_key(k)]:
            del sd[key]
    return sd


def load_vqa(model, path_or_sd, config=None):
    """Pretraining or VQA file -> VQA model; momentum copies from the online weights when the file has none."""
    sd, path = _sd(path_or_sd)
    missing, unexpected = ckpt._load_and_report(model, convert_to_vqa(sd, model), path)
    ckpt.init_momentum_from_online(model, missing)
    return missing, unexpected


def load_ve(model, path_or_sd, config=None):
    """Pretraining or SNLI-VE file -> SNLI-VE model (ALBEF's rule)."""
    return ckpt.load_ve_checkpoint(model, path_or_sd)


def convert_pretrain_to_ta(sd, model):
    """Pretraining weights -> the TA model: online pos_embed resized, `bert.` cut, layers 0-5 kept and layer N >= 6
    duplicated to 2(N-6)+6 and 2(N-6)+7 (the layers whose K/V pairs are shared)."""
    sd = ckpt.interpolate_pos_embeds(dict(sd), model, ('visual_encoder',))
    ckpt.strip_bert_prefix(sd)
    return ckpt.duplicate_fusion_layers(sd, shared_kv_pairs(model.text_encoder.config.num_hidden_layers)[0][0])


def load_ta(model, path_or_sd, config=None):
    """Pretraining file (converted) or TA file (as is) -> TA model."""
    sd, path = _sd(path_or_sd)
    if ckpt.is_pretrain_layout(sd):
        sd = convert_pretrain_to_ta(sd, model)
    else:
        sd = ckpt.interpolate_pos_embeds(sd, model)
    return ckpt._load_and_report(model, sd, path)


def load_nlvr(model, path_or_sd, config=None):
    """TA file (the release's start; momentum copies kept from construction) or NLVR2 file -> NLVR2 model."""
    sd, path = _sd(path_or_sd)
    if ckpt.is_pretrain_layout(sd):
        raise ckpt.CheckpointError(f'{path} is a SIMLA pretraining checkpoint: NLVR2 starts from the text-assignment '
                                   f'checkpoint (run Pretrain_nlvr.py with model: simla on it first)')
    momentum_init = (config or {}).get('nlvr_momentum_init', 'before_load')
    return ckpt.load_nlvr_checkpoint(model, sd, momentum_init)
