"""Config files: the key registry, YAML loading with --opt overrides, validation, and saving the resolved config.

Every key a config may hold is declared once in `CONFIG_KEYS` (with its type and, for switches, its default); an
unknown key is an error naming the closest known ones, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import difflib
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Iterable

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

import utils

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_NO_DEFAULT = object()


@dataclass(frozen=True)
class Key:
    """One config key: accepted Python types, optional allowed values, and the default filled in when absent."""

    types: tuple
    choices: tuple = ()
    default: Any = _NO_DEFAULT
    nullable: bool = False


INT, NUM, BOOL, STR, LIST, MAP = (int,), (int, float), (bool,), (str,), (list,), (dict,)
STR_OR_LIST = (str, list)
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true/false", str: "a string", list: "a list",
               dict: "a mapping"}

_DATA_KEYS = {
    "train_file": Key(STR_OR_LIST), "val_file": Key(STR_OR_LIST, nullable=True),
    "test_file": Key(STR_OR_LIST, nullable=True), "image_root": Key(STR), "answer_list": Key(STR),
    "vqa_root": Key(STR), "vg_root": Key(STR), "refcoco_data": Key(STR), "det_file": Key(STR),
    "coco_file": Key(STR), "skip_bad_images": Key(BOOL), "num_workers": Key(INT),
    "crop_min_scale": Key(NUM, nullable=True),
    # the images' normalisation: clip (ALBEF, the default when absent) or half (mean = std = 0.5, VLMo spec 13.3)
    "image_norm": Key(STR, ("clip", "half"), nullable=True),
    # WebDataset shards instead of train_file (dataset/shards.py): shard folder/index/tar patterns, samples per
    # epoch over all ranks (default: the index total) and the shuffle-buffer size
    "train_shards": Key(STR_OR_LIST, nullable=True), "shard_epoch_samples": Key(INT, nullable=True),
    "shuffle_buffer": Key(INT),
}
_MODEL_KEYS = {
    # the model family (models/registry.py); the entry scripts build the family's task model through the registry
    "model": Key(STR),
    # BERT weights (local folder or HF-cache name; 'none' = random init); the --text_encoder flag wins
    "text_encoder": Key(STR, nullable=True),
    "bert_config": Key((str, dict)), "vit": Key(MAP), "deit_checkpoint": Key(STR, nullable=True),
    "init_deit": Key(BOOL),
    "image_res": Key(INT), "vision_width": Key(INT), "embed_dim": Key(INT), "temp": Key(NUM),
    "queue_size": Key(INT), "momentum": Key(NUM), "mlm_probability": Key(NUM), "k_test": Key(INT),
    "alpha": Key(NUM), "distill": Key(BOOL), "warm_up": Key(BOOL), "eos": Key(STR), "eval_ema": Key(BOOL),
}
_TRAINING_KEYS = {
    "batch_size": Key(INT), "batch_size_train": Key(INT), "batch_size_test": Key(INT),
    "optimizer": Key(MAP), "schedular": Key(MAP), "seed": Key(INT), "log_every": Key(INT),
    # not official: the image encoder learns at the scheduled rate times this (0 = frozen; optim.param_groups)
    "lr_mult_visual": Key(NUM),
    "max_steps_per_epoch": Key(INT, nullable=True),
    # robustness (engine.py): step checkpoints every N steps (null/0 = epoch ends only), how many step checkpoints
    # to keep, how many non-finite-loss steps may be skipped before the run stops (0 = stop at the first), and
    # per-batch data seeds from (seed, epoch, step) so a mid-epoch resume is exact with DataLoader workers
    "checkpoint_every_steps": Key(INT, nullable=True), "keep_step_checkpoints": Key(INT),
    "skip_nonfinite_steps": Key(INT), "data_seed_per_step": Key(BOOL),
    # epoch checkpoints kept besides checkpoint_last.pth: null = as the official script (every epoch where it has no
    # selection metric, only checkpoint_best.pth where it has one), true = every epoch, false = none
    "keep_epoch_checkpoints": Key(BOOL, nullable=True),
    # bit-identical runs: deterministic kernels and the settings CUDA needs (README, "Reproducible runs")
    "deterministic": Key(BOOL),
    # TensorBoard scalar event files in output_dir/tensorboard (written without the tensorboard package)
    "tensorboard": Key(BOOL),
}
_SPEED_KEYS = {
    "grad_checkpointing": Key(BOOL), "compile": Key(BOOL), "attention": Key(STR, ("sdpa", "explicit")),
    "ema": Key(STR, ("reference", "foreach")), "vectorized_negatives": Key(BOOL), "queue_wraparound": Key(BOOL),
    # training: project each fusion layer's image K/V once per step for the ITM and MLM passes
    "kv_reuse": Key(BOOL),
    # retrieval evaluation: 'fast' = batched re-ranker with per-image K/V reuse, 'reference' = official loop
    "rerank_method": Key(STR, ("fast", "reference")), "rerank_batch": Key(INT, nullable=True),
    # one switch for attention/ema/vectorized_negatives/kv_reuse/fused AdamW (models/speed.py), default reference;
    # an explicitly set individual key always wins over the preset
    "mode": Key(STR, ("reference", "fast"), nullable=True),
}
# Opt-in alternatives to official quirks (docs/QUIRKS.md). Defaults are the official behaviour and are written into
# every loaded config so that each run's saved config records them.
QUIRK_FLAGS = {
    "mlm_distill_softmax_dim": Key(STR, ("vocab", "seq"), "vocab"),
    "vqa_decoder_distill": Key((str, bool), ("on", "off", True, False), "on"),
    "nlvr_momentum_init": Key(STR, ("before_load", "after_load"), "before_load"),
    "wd_exempt_extra": Key(LIST, default=[]),
    "warmup_step_size": Key(INT, default=100),
    "momentum_eval_mode": Key(BOOL, default=False),
    "reset_queues_on_finetune": Key(BOOL, default=False),
    "rerank_score": Key(STR, ("itm", "itm+itc"), "itm"),
    "vqa_first_token_once": Key(BOOL, default=False),
    "gradcam_block": Key(INT, default=8),
    "gradcam_mode": Key(STR, ("itm", "itc"), "itm"),
    "precision": Key(STR, ("fp32", "bf16", "fp16"), "fp32"),
    "randaugment_fixes": Key(BOOL, default=False),
}

# Keys of the other model families (models/registry.py) and of the synthetic benchmark: each keeps its top-level keys
# in its _*_KEYS and its nested blocks (a top-level Key(MAP) plus the block's keys) in its _*_BLOCKS, so families
# never edit each other's lines.
_SIMLA_KEYS: dict[str, Key] = {
    # SIMLA (models/simla/, docs/README_simla.md; SIMLA.md section 10.2): the ViT mask token (pretraining only),
    # the release's name of the MIM vocabulary, the fine-tuning temp clamp, whether retrieval enqueues idx (the
    # release never does), the COCO split and the Flickr selection split of the release
    "vit_mask_token": Key(BOOL), "mim_vocab_size": Key(INT), "temp_clamp_finetune": Key(BOOL),
    "enqueue_idx": Key(BOOL), "coco_split": Key(STR, ("karpathy", "coco2017val")), "select_on": Key(STR, ("val", "test")),
    # the SIMLA blocks below (their keys in _SIMLA_BLOCKS)
    "bert": Key(MAP), "mim": Key(MAP), "psl": Key(MAP), "loss_weights": Key(MAP),
}
_SIMLA_BLOCKS: dict[str, dict[str, Key]] = {
    # applied over bert_config: the shared stream (cross-attention in every layer) and the optional token types
    "bert": {"num_hidden_layers": Key(INT), "fusion_layer": Key(INT), "shared_text_fusion": Key(BOOL),
             "use_token_type_embeddings": Key(BOOL)},
    # cross-modal masked image modelling: the visual tokenizer, its view, the block-wise patch masks, the caption
    # context of the image-query pass
    "mim": {"enabled": Key(BOOL), "tokenizer": Key(STR, ("dalle", "color_quant", "random_dvae")),
            "tokenizer_path": Key(STR, nullable=True), "vocab_size": Key(INT), "tokenizer_res": Key(INT),
            "color_levels": Key(INT), "view": Key(STR, ("shared", "independent")), "num_masking_patches": Key(INT),
            "min_num_patches": Key(INT), "max_num_patches": Key(INT, nullable=True), "min_aspect": Key(NUM),
            "text_context": Key(STR, ("embeddings", "text_mode"))},
    # pseudo-keyword prediction: the attention layer, the selection rule and the ids never used as targets
    "psl": {"enabled": Key(BOOL), "attn_layer": Key(INT), "selection": Key(STR, ("head_vote", "mean_row")),
            "topk_per_head": Key(INT), "num_keywords": Key(INT), "drop_ids": Key(LIST)},
    # weights of the summed pretraining loss (all 1.0 in the paper and the release)
    "loss_weights": {"itc": Key(NUM), "itm": Key(NUM), "mlm": Key(NUM), "mim": Key(NUM), "psl": Key(NUM)},
}
_CODIS_KEYS: dict[str, Key] = {
    # CODIS (models/codis.py, docs/README_codis.md): every key of the block is a labelled default "CODIS D-n"
    "codis": Key(MAP),
}
_CODIS_BLOCKS: dict[str, dict[str, Key]] = {
    "codis": {
        # D-1 the codebook: K codes of the ITC embedding size, shared by both modalities, normal init, unit rows;
        # an EMA copy for the teacher side when codebook_momentum
        "codebook_size": Key(INT), "codebook_dim": Key(INT, nullable=True), "codebook_init": Key(STR, ("normal",)),
        "codebook_proj": Key(STR, ("shared",)), "codebook_momentum": Key(BOOL),
        # D-6 unit rows re-imposed every step; no codebook gradient for the first freeze_iters steps
        "codebook_renormalize": Key(BOOL), "codebook_freeze_iters": Key(INT),
        # D-5 Sinkhorn-Knopp teacher codes: eps, iterations (0 = softmax(S/eps)), queue samples (null = K - G),
        # one problem per modality or a joint one
        "sinkhorn_eps": Key(NUM), "sinkhorn_iters": Key(INT), "sinkhorn_queue_samples": Key(INT, nullable=True),
        "sinkhorn_joint": Key(BOOL),
        # D-4 student temperature, the cross-modal code loss, the same-modality term, the step it starts
        "code_temp": Key(NUM), "code_loss": Key(STR, ("swapped", "assignment_contrast")), "code_intra": Key(BOOL),
        "code_start_iter": Key(INT),
        # D-3 in-modal contrast: the positive view and momentum distillation on it
        "intra_view": Key(STR, ("same",)), "intra_distill": Key(BOOL),
        # D-2 loss weights
        "weight_itc": Key(NUM), "weight_intra": Key(NUM), "weight_code": Key(NUM), "weight_itm": Key(NUM),
        "weight_mlm": Key(NUM),
    },
}
_VLMO_KEYS: dict[str, Key] = {
    # VLMo (models/vlmo.py, docs/README_vlmo.md): the stage (Pretrain.py: textmlm = stage 2, pretrain = stage 3) or
    # the fine-tuning task, fixed text length (stage 3 and fine-tuning 40, stage 2 196), the stage-2 text length the
    # relative position table is anchored at, the vocabulary and the VQA answer count
    "task": Key(STR, ("textmlm", "pretrain", "retrieval", "vqa", "nlvr")), "max_text_len": Key(INT),
    "max_text_len_of_initckpt": Key(INT), "vocab_size": Key(INT), "vqa_num_labels": Key(INT),
    # the official global batch (reached by accumulation) and the precision of retrieval encoding
    "batch_size_global": Key(INT, nullable=True), "eval_precision": Key(STR, ("run", "fp16")),
    # learning-rate multiplier of the VQA / NLVR2 classifier heads (official lr_mult)
    "lr_mult_heads": Key(NUM),
    # stage 2's text-only data: plain-text files, one sample per line (VLMo.md 3.3, 13.2; dataset/text_lines.py)
    "text_files": Key(LIST),
    # the VLMo blocks below (their keys in _VLMO_BLOCKS)
    "vlmo": Key(MAP), "loss_weights": Key(MAP), "itc": Key(MAP), "mlm": Key(MAP), "retrieval": Key(MAP),
    "schedule": Key(MAP), "data": Key(MAP),
}
_VLMO_BLOCKS: dict[str, dict[str, Key]] = {
    # the Multiway Transformer (vlmo_base_patch16 defaults in models/vlmo.py) and the local input checkpoints
    "vlmo": {"patch_size": Key(INT), "embed_dim": Key(INT), "depth": Key(INT), "num_heads": Key(INT),
             "mlp_ratio": Key(NUM), "vlffn_start_layer_index": Key(INT),
             "layer_scale_init_values": Key(NUM, nullable=True), "use_abs_pos_emb": Key(BOOL),
             "use_rel_pos_bias": Key(BOOL), "drop_path_rate": Key(NUM), "layer_norm_eps": Key(NUM),
             "qkv_bias": Key(BOOL), "init_std": Key(NUM), "init": Key(MAP)},
    # the loss_weights block is shared with SIMLA: VLMo adds its keys to SIMLA's (never removes any)
    "loss_weights": {**_SIMLA_BLOCKS.get("loss_weights", {}), "itc": Key(NUM), "itm": Key(NUM), "mlm": Key(NUM)},
    # itc.vl_branch: the second contrastive term through the VL experts (official); gather_with_grad: not official
    "itc": {"vl_branch": Key(BOOL), "gather_with_grad": Key(BOOL)},
    "mlm": {"masking": Key(STR, ("wwm", "token")), "probability": Key(NUM)},
    "retrieval": {"mode": Key(STR, ("dual", "dual_rerank"))},
    # per-optimizer-step linear warm-up then polynomial decay, or half a cosine with sched: cosine (the official
    # decay_power: cosine) (engine/loop.py fit, scheduler.StepScheduler):
    # warmup_steps a float = a fraction of the total; max_steps null = epoch-based (total = micro-batches per epoch x
    # epochs // accumulation); epochs = the number of epochs then, else at most that many (official max_epoch)
    "schedule": {"sched": Key(STR, ("linear", "cosine")), "max_steps": Key(INT, nullable=True),
                 "warmup_steps": Key(NUM), "end_lr": Key(NUM), "power": Key(NUM), "epochs": Key(INT)},
    # text_cleaning: raw (VLMo.md 3.1, the default for model: vlmo) or albef (pre_caption / pre_question)
    "data": {"caption_sampling": Key(STR, ("per_caption", "random")), "text_cleaning": Key(STR, ("raw", "albef")),
             "drop_last": Key(BOOL), "hflip": Key(BOOL), "crop_scale": Key(LIST)},
}
_SYNTHETIC_KEYS: dict[str, Key] = {
    # the image-blind control of any run (dataset.create_dataset, docs/README_synthetic.md): every picture replaced by
    # one fixed picture of its split, or shuffled against the texts (seeded by image_blind_seed); null = the pictures
    "image_blind": Key(STR, ("fixed", "shuffled"), nullable=True), "image_blind_seed": Key(INT),
}

CONFIG_KEYS: dict[str, dict[str, Key]] = {
    "top": {**_DATA_KEYS, **_MODEL_KEYS, **_TRAINING_KEYS, **_SPEED_KEYS, **QUIRK_FLAGS, **_SIMLA_KEYS, **_CODIS_KEYS,
            **_VLMO_KEYS, **_SYNTHETIC_KEYS},
    # opt (checked by optim.create_optimizer): adamW (ALBEF; = adamw_torch, torch's AdamW) or adamw_hf (transformers
    # 4.8.1 AdamW, VLMo; optim/adamw_hf.py); betas / eps: AdamW's (default (0.9, 0.999) / 1e-8, ALBEF's values; the
    # VLMo configs set [0.9, 0.98] / 1e-8)
    "optimizer": {"opt": Key(STR), "lr": Key(NUM),
                  "weight_decay": Key(NUM), "betas": Key(LIST), "eps": Key(NUM)},
    "schedular": {"sched": Key(STR, ("cosine",)), "lr": Key(NUM), "epochs": Key(INT), "min_lr": Key(NUM),
                  "decay_rate": Key(NUM), "warmup_lr": Key(NUM), "warmup_epochs": Key(INT),
                  "cooldown_epochs": Key(INT)},
    # keyword arguments of models.vit.VisionTransformer (defaults there are ViT-B/16)
    "vit": {"patch_size": Key(INT), "in_chans": Key(INT), "embed_dim": Key(INT), "depth": Key(INT),
            "num_heads": Key(INT), "mlp_ratio": Key(NUM), "qkv_bias": Key(BOOL), "eps": Key(NUM)},
    **_SIMLA_BLOCKS, **_CODIS_BLOCKS, **_VLMO_BLOCKS,
}


class ConfigError(ValueError):
    """A config file (or --opt override) that cannot be used; the message names the file, the key and the fix."""


def _yaml() -> YAML:
    # typ='safe' follows YAML 1.2, where 1e-4 is a float (PyYAML's 1.1 loader returns a string).
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.representer.sort_base_mapping_type_on_output = False  # keep the config's own key order when saving
    return yaml


def load_config(path: str, overrides: Iterable[str] = ()) -> dict:
    """Read a YAML config, apply `key.sub=value` overrides, validate it and fill the quirk-flag defaults."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist; pass --config configs/<Task>.yaml")
    try:
        with open(path) as f:
            config = _yaml().load(f)
    except YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(config).__name__}")
    apply_overrides(config, overrides, path)
    validate_config(config, path)
    if isinstance(config.get("bert_config"), str):
        config["bert_config"] = _resolve_bert_config(config["bert_config"], path)
    for name, key in QUIRK_FLAGS.items():
        config.setdefault(name, _copy_default(key.default))
    return config


def _copy_default(value):
    return list(value) if isinstance(value, list) else value


def parse_override(text: str, source: str = "--opt") -> tuple[list[str], Any]:
    """'optimizer.lr=2e-4' -> (['optimizer', 'lr'], 2e-4); the value is read as a YAML 1.2 scalar."""
    if "=" not in text:
        raise ConfigError(f"{source}: override {text!r} must look like key=value (e.g. optimizer.lr=2e-4)")
    dotted, raw = text.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"{source}: override {text!r} has an empty key name")
    try:
        value = _yaml().load(raw) if raw.strip() else None
    except YAMLError:
        value = raw  # not YAML (e.g. an odd path): keep the literal string
    return keys, value


def apply_overrides(config: dict, overrides: Iterable[str], source: str = "--opt") -> dict:
    """Set each dotted `key=value` in place (intermediate mappings are created) and return the config."""
    for text in overrides or ():
        keys, value = parse_override(text, source)
        node = config
        for depth, name in enumerate(keys[:-1]):
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: override {text!r}: {'.'.join(keys[:depth + 1])} is not a mapping")
        node[keys[-1]] = value
    return config


def validate_config(config: dict, source: str = "<config>") -> None:
    """Raise ConfigError for unknown keys, wrong types or values outside the allowed choices."""
    _validate_block(config, CONFIG_KEYS["top"], "", source)
    for block in CONFIG_KEYS:
        if block != "top" and isinstance(config.get(block), dict):
            _validate_block(config[block], CONFIG_KEYS[block], f"{block}.", source)


def _validate_block(block: dict, known: dict[str, Key], prefix: str, source: str) -> None:
    for name, value in block.items():
        if name not in known:
            raise ConfigError(_unknown_key_message(str(name), known, prefix, source))
        _check_value(prefix + name, value, known[name], source)


def _unknown_key_message(name: str, known: dict, prefix: str, source: str) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(prefix + c for c in close)}?" if close else \
        f"valid {prefix.rstrip('.') or 'top-level'} keys: {', '.join(sorted(known))}."
    return (f"{source}: unknown config key {prefix + name!r}; {hint} "
            "(a genuinely new key must first be added to CONFIG_KEYS in engine/config.py)")


def _check_value(name: str, value: Any, key: Key, source: str) -> None:
    if value is None:
        if key.nullable:
            return
        raise ConfigError(f"{source}: {name!r} is empty (null); give it a value or delete the line")
    if not _has_type(value, key.types):
        expected = " or ".join(_TYPE_WORDS[t] for t in key.types)
        hint = " (write numbers unquoted, e.g. 1e-4)" if isinstance(value, str) and _looks_numeric(value) else ""
        raise ConfigError(f"{source}: {name!r} must be {expected}, got {type(value).__name__} {value!r}{hint}")
    if key.choices and value not in key.choices:
        raise ConfigError(f"{source}: {name!r} must be one of {list(key.choices)}, got {value!r}")


def _has_type(value: Any, types: tuple) -> bool:
    if isinstance(value, bool):
        return bool in types  # bool is an int subclass; True is never a valid image_res
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def resolve_path(path: str, config_path: str | None = None) -> str | None:
    """Absolute path of an existing file given relative to the cwd, the repo root or the config's folder."""
    candidates = [path] if os.path.isabs(path) else [os.path.join(os.getcwd(), path), os.path.join(REPO_ROOT, path)]
    if config_path and not os.path.isabs(path):
        candidates.append(os.path.join(os.path.dirname(os.path.abspath(config_path)), path))
    for candidate in candidates:
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    return None


def _resolve_bert_config(value: str, source: str) -> str:
    resolved = resolve_path(value, source)
    if resolved is None:
        raise ConfigError(f"{source}: bert_config file {value!r} does not exist (looked in the current folder and "
                          f"in {REPO_ROOT}); set bert_config: configs/config_bert.json or give the fields inline")
    return resolved


def load_bert_config(value: str | dict) -> dict:
    """The BERT fields named by `bert_config`: a JSON file path or an inline mapping."""
    if isinstance(value, dict):
        return dict(value)
    resolved = resolve_path(value)
    if resolved is None:
        raise ConfigError(f"bert_config file {value!r} does not exist; point it at configs/config_bert.json")
    with open(resolved) as f:
        return json.load(f)


def _plain(obj):
    """Dicts/lists/scalars only, so the safe YAML dumper accepts tuples and paths too."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def save_config(config: dict, path: str) -> None:
    """Write the resolved config as YAML (atomically), e.g. to output_dir/config.yaml."""
    stream = io.StringIO()
    _yaml().dump(_plain(config), stream)
    text = stream.getvalue().encode()
    utils.atomic_write_bytes(text, path)
