"""Reading checkpoints and every official conversion rule, one function per rule.

Nothing here downloads: DeiT, BERT and ALBEF weights come from local paths the user gives.
"""
import os
import pickle
import warnings
import zipfile

import torch

from .vit import interpolate_pos_embed


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or of the wrong layout."""


_TRUSTED = set()


def trust_checkpoint_file(path):
    """Allow full unpickling of `path` (it can run code) when weights-only loading rejects it (--trust_checkpoint)."""
    _TRUSTED.add(os.path.realpath(path))


def _needed_object(error):
    """The global a weights-only load refused, as torch names it in its error message; None for other failures."""
    text = str(error)
    for marker in ('Unsupported global: GLOBAL ', 'Unsupported class '):
        if marker in text:
            return text.split(marker, 1)[1].split()[0].rstrip('.,')
    return None


def load_checkpoint_file(path):
    """torch.load on CPU with weights_only=True; full unpickling only for files the user trusts by name.

    A file that holds more than tensors and plain containers (e.g. an argparse Namespace in an old checkpoint) is
    refused with a message naming the object and the two ways on: trust the file, or convert it once to a plain
    state dict with `python -m models.checkpoint to-state-dict IN OUT`.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path} does not exist; check the --checkpoint / config path')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as refused:
        needed = _needed_object(refused)
        if needed is None:
            raise CheckpointError(f'checkpoint {path} is truncated or corrupt ({str(refused).splitlines()[-1]}); '
                                  f're-download or re-create it, or resume from an earlier checkpoint') from refused
        if os.path.realpath(path) not in _TRUSTED:
            raise CheckpointError(
                f'{path} cannot be loaded with weights_only=True: it holds {needed}, and full '
                f'unpickling can run code from the file. If you trust it, pass --trust_checkpoint {path} (or convert '
                f'it once: python -m models.checkpoint to-state-dict {path} OUT.pth --trust, then use OUT.pth)'
            ) from refused
    except Exception as e:
        raise CheckpointError(f'checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e}); '
                              f're-download or re-create it, or resume from an earlier checkpoint') from e
    try:
        obj = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        raise CheckpointError(f'checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e}); '
                              f're-download or re-create it, or resume from an earlier checkpoint') from e
    warnings.warn(f'{path}: fully unpickled because you trusted it (--trust_checkpoint)')
    return obj


def verify_checkpoint_file(path):
    """Raise CheckpointError unless every member of the (zip-format) checkpoint matches its CRC-32.

    torch.load does not check the sums, so flipped bytes inside a tensor would otherwise load silently. A file that
    is not a zip at all (e.g. truncated, so its central directory is gone) is left for torch.load to reject.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path} does not exist; check the --resume / --checkpoint path')
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f'checkpoint {path} is corrupt ({type(e).__name__}: {e}); resume from an earlier '
                              f'checkpoint (--resume auto falls back to one by itself)') from e
    if bad is not None:
        raise CheckpointError(f'checkpoint {path} is corrupt: {bad} fails its CRC-32 check; resume from an earlier '
                              f'checkpoint (--resume auto falls back to one by itself)')


def unwrap_state_dict(obj, path='<checkpoint>'):
    """The model state dict of a `{'model': sd, ...}` training checkpoint or of a raw state dict."""
    if isinstance(obj, dict) and 'model' in obj and isinstance(obj['model'], dict):
        return obj['model']
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise CheckpointError(f'{path} holds neither a state dict nor a dict with a "model" state dict')


def load_state_dict_file(path):
    """Read `path` and return its model state dict (wrapped or raw)."""
    return unwrap_state_dict(load_checkpoint_file(path), path)


def resolve_pretrained_folder(name_or_path, kind='text encoder'):
    """A local folder for a HuggingFace model: the path itself, or the snapshot already in the local HF cache."""
    if os.path.isdir(name_or_path):
        return name_or_path
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name_or_path, local_files_only=True)
    except Exception:
        raise CheckpointError(f'{kind} {name_or_path!r} is neither a local folder nor in the local HuggingFace '
                              f'cache; pass a folder holding config.json + model.safetensors (or '
                              f'pytorch_model.bin), or "none" for random initialisation') from None


def _read_hf_weights(folder):
    st = os.path.join(folder, 'model.safetensors')
    if os.path.isfile(st):
        from safetensors.torch import load_file
        return load_file(st)
    pt = os.path.join(folder, 'pytorch_model.bin')
    if os.path.isfile(pt):
        return torch.load(pt, map_location='cpu', weights_only=True)
    raise CheckpointError(f'{folder} has no model.safetensors or pytorch_model.bin')


def bert_key_map(key):
    """Map a HuggingFace BERT key to our names (relative to the BertModel), or None to ignore it."""
    key = key.replace('LayerNorm.gamma', 'LayerNorm.weight').replace('LayerNorm.beta', 'LayerNorm.bias')
    if key.startswith('bert.'):
        key = key[len('bert.'):]
    if key.startswith(('pooler.', 'cls.seq_relationship')):
        return None
    return key


def load_bert_pretrained(module, name_or_path):
    """Load bert-base-uncased-style weights from a local folder into a BertModel or a `bert`+`cls` wrapper."""
    folder = resolve_pretrained_folder(name_or_path)
    source = _read_hf_weights(folder)
    has_head = hasattr(module, 'bert')
    target = {}
    for key, value in source.items():
        new = bert_key_map(key)
        if new is None or (new.startswith('cls.') and not has_head):
            continue
        if has_head and not new.startswith('cls.'):
            new = 'bert.' + new
        target[new] = value
    missing, unexpected = module.load_state_dict(target, strict=False)
    # cross-attention blocks (and any layer beyond the source depth) stay randomly initialised, as in the paper
    really_missing = [k for k in missing if 'crossattention' not in k and not k.endswith('decoder.weight')
                      and not k.endswith('decoder.bias')]
    print(f'loaded text weights from {folder}: {len(target)} tensors, {len(missing)} left at random init '
          f'(cross-attention and extra layers), {len(unexpected)} unused')
    return really_missing, unexpected


def load_deit(visual_encoder, path):
    """Initialise a ViT from a local DeiT checkpoint (state dict under `model`), interpolating pos_embed."""
    if not path or not os.path.isfile(str(path)):
        raise CheckpointError(f'DeiT checkpoint {path!r} not found; set deit_checkpoint in the config to a local '
                              f'deit_base_patch16_224-b5f2ef4d.pth (for the synthetic config: create it with '
                              f'`python -m synthetic.deit --root data/synthetic`), or set init_deit: false '
                              f'to start from random')
    return load_vit_weights(visual_encoder, unwrap_state_dict(load_checkpoint_file(path), path), path)


def load_vit_weights(visual_encoder, sd, path='<checkpoint>'):
    """Load a DeiT-layout ViT state dict (its classifier head dropped, pos_embed interpolated to the encoder's
    resolution) into `visual_encoder`; returns the unexpected keys. `path` names the source in errors."""
    sd = {k: v for k, v in sd.items() if k not in ('head.weight', 'head.bias')}
    sd['pos_embed'] = interpolate_pos_embed(sd['pos_embed'], visual_encoder)
    missing, unexpected = visual_encoder.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != 'mask_token']  # SIMLA's pretraining ViT: not in DeiT, starts at zero
    if missing:
        raise CheckpointError(f'{path} does not fit the ViT: missing {missing[:5]}')
    return unexpected


# ---- ALBEF checkpoint layouts and the retrieval / grounding conversion ---------------------
QUEUE_KEYS = ('image_queue', 'text_queue', 'idx_queue', 'queue_ptr')


def is_momentum_key(key):
    """True for keys of momentum modules (`visual_encoder_m.*`, `text_proj_m.*`, ...)."""
    return key.split('.', 1)[0].endswith('_m')


def has_momentum_keys(sd):
    """Whether a state dict holds momentum modules (training form) or not (raw released files)."""
    return any(is_momentum_key(k) for k in sd)


def is_pretrain_layout(sd):
    """Whether the text encoder is stored as `text_encoder.bert.*` (pretraining checkpoints)."""
    return any(k.startswith('text_encoder.bert.') for k in sd)


def interpolate_pos_embeds(sd, model, prefixes=('visual_encoder', 'visual_encoder_m')):
    """Resize `<prefix>.pos_embed` to the model's grid for every listed ViT present in both."""
    for prefix in prefixes:
        key = f'{prefix}.pos_embed'
        if key in sd and hasattr(model, prefix):
            sd[key] = interpolate_pos_embed(sd[key], getattr(model, prefix))
    return sd


def strip_bert_prefix(sd):
    """Rule 8.1 step 2: every key containing 'bert' loses 'bert.' (`text_encoder.bert.X` -> `text_encoder.X`)."""
    for key in list(sd):
        if 'bert' in key:
            sd[key.replace('bert.', '')] = sd.pop(key)
    return sd


def drop_training_state(sd):
    """Remove momentum and queue tensors (not part of the inference form); returns the removed keys."""
    dropped = [k for k in sd if is_momentum_key(k) or k in QUEUE_KEYS]
    for key in dropped:
        del sd[key]
    return dropped


def convert_to_retrieval(sd, model):
    """Pretrained or fine-tuned weights -> the retrieval/grounding layout of `model`.

    The source layout is detected instead of assumed: pretraining files get `bert.` stripped (official rule),
    raw fine-tuned files are taken as they are; momentum/queue tensors are dropped for an inference-form model.
    Returns (state dict, dropped keys).
    """
    sd = interpolate_pos_embeds(dict(sd), model)
    if is_pretrain_layout(sd):
        strip_bert_prefix(sd)
    dropped = [] if getattr(model, 'with_momentum', True) else drop_training_state(sd)
    return sd, dropped


def has_momentum_models(model):
    """Whether the task model was built with momentum copies (retrieval: with_momentum; VQA/NLVR/VE: distill)."""
    return bool(getattr(model, 'with_momentum', getattr(model, 'distill', False)))


@torch.no_grad()
def init_momentum_from_online(model, missing, why='the checkpoint has none'):
    """A file without momentum weights: copy online -> momentum and, where the model has queues, fresh queues.

    The one rule for every task; returns whether it copied.
    """
    momentum_missing = [k for k in missing if is_momentum_key(k)]
    if not has_momentum_models(model) or not momentum_missing:
        return False
    model.copy_params()
    queues = hasattr(model, 'image_queue')
    if queues:
        model.reset_queues()
    print(f'momentum weights missing ({len(momentum_missing)} keys, {why}): momentum models copied from the loaded '
          f'online weights' + (', queues re-initialised (random unit vectors, idx -100, ptr 0)' if queues else ''))
    return True


def check_queue_shapes(sd, model, path):
    """A clear error when the checkpoint's queues do not fit the model's queue_size / embed_dim."""
    for key in ('image_queue', 'text_queue'):
        if key in sd and hasattr(model, key) and sd[key].shape != getattr(model, key).shape:
            raise CheckpointError(f'{path}: {key} has shape {tuple(sd[key].shape)} but the model expects '
                                  f'{tuple(getattr(model, key).shape)}; set queue_size to {sd[key].shape[1]}, or '
                                  f'reset_queues_on_finetune: true to start from fresh queues')


def load_retrieval_checkpoint(model, path_or_sd, reset_queues=False):
    """Load a pretraining, fine-tuned (training checkpoint) or raw released file into a retrieval/grounding model.

    Returns (missing, unexpected, dropped) key lists; the official outcome for a pretraining file is
    missing = [idx_queue] and unexpected = the 14 `*.cls.predictions.*` keys. `reset_queues` (config key
    reset_queues_on_finetune, docs/QUIRKS.md) starts from fresh queues instead of the checkpoint's.
    """
    sd, path = _source(path_or_sd)
    sd, dropped = convert_to_retrieval(sd, model)
    if reset_queues:
        dropped += [k for k in QUEUE_KEYS if sd.pop(k, None) is not None]
    check_queue_shapes(sd, model, path)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    print(f'load checkpoint from {path}')
    if missing == ['temp'] and not unexpected:
        warnings.warn(f'{path} has no temp; keeping the configured temp {float(model.temp):.4g}')
    print(f'missing keys: {len(missing)} {_abbrev(missing)}; unexpected keys: {len(unexpected)} {_abbrev(unexpected)}'
          + (f'; {len(dropped)} momentum/queue tensors not used' if dropped else ''))
    if not init_momentum_from_online(model, missing) and reset_queues and getattr(model, 'with_momentum', False):
        model.reset_queues()
        print('reset_queues_on_finetune: queues re-initialised (random unit vectors, idx -100, ptr 0)')
    return list(missing), list(unexpected), dropped


def _abbrev(keys, n=4):
    keys = list(keys)
    return '[' + ', '.join(keys[:n]) + (', ...' if len(keys) > n else '') + ']'


# ---- VQA conversion ----------------------------------------------------------------------------
def is_vqa_layout(sd):
    """Whether a state dict already holds an answer decoder (a fine-tuned VQA file)."""
    return any(k.startswith(('text_decoder.', 'text_decoder_m.')) for k in sd)


def pretrain_to_vqa(sd, fusion_layer=6):
    """Rule 8.3 on a pretraining state dict (in place): encoder from all layers, decoder from the fusion layers.

    Over the original keys: every key containing 'bert' is also copied without 'bert.' (the text encoder); every
    `text_encoder*` key is then moved to `text_decoder*` (keeping 'bert.'), where layer N < fusion_layer is
    dropped and layer N >= fusion_layer becomes decoder layer N - fusion_layer; embeddings and the MLM head move
    unchanged, so `text_encoder_m` feeds `text_decoder_m` likewise.
    """
    for key in list(sd):
        if 'bert' in key:
            sd[key.replace('bert.', '')] = sd[key]
        if 'text_encoder' not in key:
            continue
        fields = key.split('.')
        if 'layer' in key:  # 'LayerNorm' does not match: only encoder.layer.N keys
            layer_num = int(fields[4])
            if layer_num < fusion_layer:
                del sd[key]
                continue
            fields[4] = str(layer_num - fusion_layer)
        sd['.'.join(fields).replace('text_encoder', 'text_decoder')] = sd.pop(key)
    return sd


def convert_to_vqa(sd, model):
    """Pretrained or fine-tuned weights -> the VQA layout of `model`, detecting the source layout."""
    sd = interpolate_pos_embeds(dict(sd), model)
    if is_pretrain_layout(sd) and not is_vqa_layout(sd):
        pretrain_to_vqa(sd, model.text_encoder.config.fusion_layer)
    elif not getattr(model, 'distill', True):
        for key in [k for k in sd if is_momentum_key(k)]:
            del sd[key]  # a distill-trained file evaluated by a model without momentum copies
    return sd


def load_vqa_checkpoint(model, path_or_sd):
    """Load a pretraining checkpoint or a VQA file (wrapped or raw, with or without `_m` keys) into a VQA model.

    Returns (missing, unexpected) key lists; the official outcome for a pretraining file is no missing key and
    the 14 unexpected keys `temp`, the queues, the projections and `itm_head`.
    """
    sd, path = _source(path_or_sd)
    sd = convert_to_vqa(sd, model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    print(f'load checkpoint from {path}')
    print(f'missing keys: {len(missing)} {_abbrev(missing)}; unexpected keys: {len(unexpected)} {_abbrev(unexpected)}')
    init_momentum_from_online(model, missing)
    return list(missing), list(unexpected)


# ---- NLVR2 text assignment, NLVR2 and SNLI-VE ---------------------------------------------
def is_ta_layout(sd):
    """Whether a state dict comes from text-assignment pretraining (it has `ta_head`)."""
    return 'ta_head.weight' in sd


def duplicate_fusion_layers(sd, fusion_layer):
    """Rule 8.4: text-encoder layer N >= f becomes layers 2(N-f)+f and 2(N-f)+f+1 (6 -> 6,7 ... 11 -> 16,17).

    Applies to `text_encoder*.encoder.layer.N.*` keys (after `bert.` was stripped); layers below f keep their
    number. Returns a new dict (the targets overlap the source numbers, so the mapping cannot run in place).
    """
    out = {}
    for key, value in sd.items():
        parts = key.split('.')
        is_layer = parts[0].startswith('text_encoder') and parts[1:3] == ['encoder', 'layer']
        if not is_layer or int(parts[3]) < fusion_layer:
            out[key] = value
            continue
        first = 2 * (int(parts[3]) - fusion_layer) + fusion_layer
        for target in (first, first + 1):
            out['.'.join(parts[:3] + [str(target)] + parts[4:])] = value
    return out


def convert_pretrain_to_ta(sd, model):
    """Pretraining weights -> the TA model: pos_embed resized, `bert.` stripped, fusion layers doubled.

    Official outcome: missing = ta_head (2); unexpected = queues, itm_head, MLM heads and every momentum key.
    """
    sd = interpolate_pos_embeds(dict(sd), model, ('visual_encoder',))
    strip_bert_prefix(sd)
    return duplicate_fusion_layers(sd, model.text_encoder.config.fusion_layer)


def convert_ta_to_nlvr(sd, model):
    """TA weights -> the NLVR2 model: only the online pos_embed is resized; keys are already NLVR2 keys."""
    return interpolate_pos_embeds(dict(sd), model, ('visual_encoder',))


def convert_pretrain_to_ve(sd, model):
    """Pretraining weights -> the SNLI-VE model: pos_embeds resized (momentum one if built), `bert.` cut.

    Official outcome: missing = cls_head and cls_head_m (8); unexpected = temp, queues, projections, itm_head and
    both MLM heads (28).
    """
    return strip_bert_prefix(interpolate_pos_embeds(dict(sd), model))


def _load_and_report(model, sd, path):
    """Non-strict load that prints and returns the missing/unexpected key lists."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    print(f'load checkpoint from {path}')
    print(f'missing keys: {len(missing)} {_abbrev(missing)}; unexpected keys: {len(unexpected)} {_abbrev(unexpected)}')
    return list(missing), list(unexpected)


class LoadedCheckpoint(dict):
    """A state dict read from `path` once, handed on to a start rule that would otherwise read the file again."""

    def __init__(self, sd, path):
        super().__init__(sd)
        self.path = path


def read_checkpoint(path):
    """The model state dict of `path` as a LoadedCheckpoint (every start rule accepts it in place of the path)."""
    return LoadedCheckpoint(load_state_dict_file(path), path)


def _source(path_or_sd):
    """(state dict, name for messages) of a path, a LoadedCheckpoint or a plain state dict."""
    if isinstance(path_or_sd, LoadedCheckpoint):
        return dict(path_or_sd), path_or_sd.path
    if isinstance(path_or_sd, dict):
        return dict(path_or_sd), '<state dict>'
    return dict(load_state_dict_file(path_or_sd)), path_or_sd


def load_pretrain_checkpoint(model, path_or_sd):
    """Continue pretraining from a pretraining checkpoint's weights (strict; pos_embed resized to this resolution)."""
    sd, path = _source(path_or_sd)
    sd = interpolate_pos_embeds(sd, model)
    model.load_state_dict(sd, strict=True)
    print(f'load checkpoint from {path}')
    return [], []


@torch.no_grad()
def load_ta_checkpoint(model, path_or_sd):
    """Start text-assignment pretraining from a pretraining file (converted) or a TA file (as is)."""
    sd, path = _source(path_or_sd)
    sd = convert_pretrain_to_ta(sd, model) if is_pretrain_layout(sd) else interpolate_pos_embeds(sd, model)
    return _load_and_report(model, sd, path)


def load_nlvr_checkpoint(model, path_or_sd, momentum_init='before_load'):
    """Load a TA file (the official start), an NLVR2 fine-tuned file, or a pretraining file (via the TA rule).

    momentum_init 'before_load' (official, docs/QUIRKS.md): the momentum models keep the copy made at construction,
    i.e. the randomly initialised ViT and BERT; 'after_load': they are copied from the loaded online weights.
    A fine-tuned file without momentum keys always gets its momentum models copied after loading.
    """
    if momentum_init not in ('before_load', 'after_load'):
        raise ValueError(f"nlvr_momentum_init must be 'before_load' or 'after_load', got {momentum_init!r}")
    sd, path = _source(path_or_sd)
    from_ta = is_ta_layout(sd)
    if is_pretrain_layout(sd):
        print(f'{path} is a pretraining checkpoint: applying the text-assignment conversion first (the official '
              f'NLVR2 recipe runs Pretrain_nlvr.py on it and starts from that checkpoint instead)')
        sd = {k: v for k, v in sd.items() if not is_momentum_key(k)}  # as a TA file: no momentum weights
        sd = convert_pretrain_to_ta(sd, model)
        from_ta = True
    sd = convert_ta_to_nlvr(sd, model) if from_ta else interpolate_pos_embeds(sd, model)
    missing, unexpected = _load_and_report(model, sd, path)
    if not from_ta:
        init_momentum_from_online(model, missing, 'the fine-tuned file has none')
    elif momentum_init == 'after_load':
        init_momentum_from_online(model, missing, 'nlvr_momentum_init: after_load')
    return missing, unexpected


def load_ve_checkpoint(model, path_or_sd):
    """Load a pretraining file (converted) or an SNLI-VE fine-tuned file (as is) into the VE model."""
    sd, path = _source(path_or_sd)
    pretrain = is_pretrain_layout(sd)
    sd = convert_pretrain_to_ve(sd, model) if pretrain else interpolate_pos_embeds(sd, model)
    missing, unexpected = _load_and_report(model, sd, path)
    if not pretrain:
        init_momentum_from_online(model, missing, 'the fine-tuned file has none')
    return missing, unexpected


def to_state_dict_file(src, dst, trust=False):
    """Write `src`'s model state dict (tensors only) to `dst`, loadable with weights_only=True."""
    if trust:
        trust_checkpoint_file(src)
    sd = {k: v for k, v in load_state_dict_file(src).items() if isinstance(v, torch.Tensor)}
    torch.save({'model': sd}, dst)
    print(f'wrote {len(sd)} tensors of {src} to {dst}')


if __name__ == '__main__':
    import argparse
    cli = argparse.ArgumentParser(description='Checkpoint utilities')
    sub = cli.add_subparsers(dest='command', required=True)
    conv = sub.add_parser('to-state-dict', help='save a checkpoint as a plain state dict (weights_only loadable)')
    conv.add_argument('src')
    conv.add_argument('dst')
    conv.add_argument('--trust', action='store_true', help='allow full unpickling of SRC (only for trusted files)')
    parsed = cli.parse_args()
    to_state_dict_file(parsed.src, parsed.dst, trust=parsed.trust)
