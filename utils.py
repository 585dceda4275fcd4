"""Shared by every entry script: config loading/validation, distributed set-up, seeding, atomic files, metrics.

Config keys live in one registry, `CONFIG_KEYS`; a new key is added there (with its type) and nowhere else.
"""
from __future__ import annotations

import builtins
import contextlib
import difflib
import io
import json
import math
import os
import random
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------------------------------------------------------
# Config registry
# ---------------------------------------------------------------------------------------------------------------

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
    # WebDataset shards instead of train_file (dataset/shards.py): shard folder/index/tar patterns, samples per
    # epoch over all ranks (default: the index total) and the shuffle-buffer size
    "train_shards": Key(STR_OR_LIST, nullable=True), "shard_epoch_samples": Key(INT, nullable=True),
    "shuffle_buffer": Key(INT),
}
_MODEL_KEYS = {
    "bert_config": Key((str, dict)), "vit": Key(MAP), "deit_checkpoint": Key(STR, nullable=True),
    "init_deit": Key(BOOL),
    "image_res": Key(INT), "vision_width": Key(INT), "embed_dim": Key(INT), "temp": Key(NUM),
    "queue_size": Key(INT), "momentum": Key(NUM), "mlm_probability": Key(NUM), "k_test": Key(INT),
    "alpha": Key(NUM), "distill": Key(BOOL), "warm_up": Key(BOOL), "eos": Key(STR), "eval_ema": Key(BOOL),
}
_TRAINING_KEYS = {
    "batch_size": Key(INT), "batch_size_train": Key(INT), "batch_size_test": Key(INT),
    "optimizer": Key(MAP), "schedular": Key(MAP), "seed": Key(INT), "log_every": Key(INT),
    "eval_every": Key(INT), "max_steps_per_epoch": Key(INT, nullable=True), "max_tokens": Key(INT, nullable=True),
    # robustness (engine.py): step checkpoints every N steps (null/0 = epoch ends only), how many step checkpoints
    # to keep, how many non-finite-loss steps may be skipped before the run stops (0 = stop at the first), and
    # per-batch data seeds from (seed, epoch, step) so a mid-epoch resume is exact with DataLoader workers
    "checkpoint_every_steps": Key(INT, nullable=True), "keep_step_checkpoints": Key(INT),
    "skip_nonfinite_steps": Key(INT), "data_seed_per_step": Key(BOOL),
}
_SPEED_KEYS = {
    "grad_checkpointing": Key(BOOL), "compile": Key(BOOL), "attention": Key(STR, ("sdpa", "explicit")),
    "ema": Key(STR, ("reference", "foreach")), "vectorized_negatives": Key(BOOL), "queue_wraparound": Key(BOOL),
    # training: project each fusion layer's image K/V once per step for the ITM and MLM passes (spec 16.6)
    "kv_reuse": Key(BOOL),
    # retrieval evaluation: 'fast' = batched re-ranker with per-image K/V reuse, 'reference' = official loop
    "rerank_method": Key(STR, ("fast", "reference")), "rerank_batch": Key(INT),
    # one switch for attention/ema/vectorized_negatives/kv_reuse/fused AdamW (model_pretrain.resolve_speed_mode);
    # unset keeps each key's own default; an explicitly set individual key always wins
    "mode": Key(STR, ("reference", "fast"), nullable=True),
}
# Spec §14: opt-in alternatives to official quirks. Defaults are the official behaviour and are written into
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
    "precision": Key(STR, ("fp32", "bf16"), "fp32"),
}

CONFIG_KEYS: dict[str, dict[str, Key]] = {
    "top": {**_DATA_KEYS, **_MODEL_KEYS, **_TRAINING_KEYS, **_SPEED_KEYS, **QUIRK_FLAGS},
    "optimizer": {"opt": Key(STR), "lr": Key(NUM), "weight_decay": Key(NUM)},
    "schedular": {"sched": Key(STR, ("cosine",)), "lr": Key(NUM), "epochs": Key(INT), "min_lr": Key(NUM),
                  "decay_rate": Key(NUM), "warmup_lr": Key(NUM), "warmup_epochs": Key(INT),
                  "cooldown_epochs": Key(INT)},
    # keyword arguments of models.vit.VisionTransformer (defaults there are ViT-B/16)
    "vit": {"patch_size": Key(INT), "in_chans": Key(INT), "embed_dim": Key(INT), "depth": Key(INT),
            "num_heads": Key(INT), "mlp_ratio": Key(NUM), "qkv_bias": Key(BOOL), "eps": Key(NUM)},
}


class ConfigError(ValueError):
    """A config file (or --opt override) that cannot be used; the message names the file, the key and the fix."""


def _yaml() -> YAML:
    # typ='safe' follows YAML 1.2, where 1e-4 is a float (PyYAML's 1.1 loader returns a string, spec §9.4).
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
            "(a genuinely new key must first be added to CONFIG_KEYS in utils.py)")


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
    _atomic_write(path, lambda f: f.write(text))


# ---------------------------------------------------------------------------------------------------------------
# Distributed
# ---------------------------------------------------------------------------------------------------------------

_BUILTIN_PRINT = builtins.print


def _launch_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun or SLURM variables, or None when not launched by either."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_NTASKS", 1)), int(env.get("SLURM_LOCALID", 0))
    return None


def _use_cuda(args) -> bool:
    return str(getattr(args, "device", "cuda")).startswith("cuda") and torch.cuda.is_available()


def init_distributed_mode(args) -> None:
    """Join the process group described by torchrun/SLURM variables; otherwise run as one process, no group."""
    launch = _launch_env()
    rank, world_size, local_rank = launch if launch else (0, 1, 0)
    args.rank, args.world_size, args.gpu = rank, world_size, local_rank
    args.distributed = world_size > 1
    if not args.distributed:
        return
    dist_url = getattr(args, "dist_url", "env://") or "env://"
    if dist_url == "env://" and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
        raise RuntimeError("distributed launch without MASTER_ADDR/MASTER_PORT: use torchrun, or under SLURM "
                           "export MASTER_ADDR=$(scontrol show hostnames $SLURM_NODELIST | head -n1) MASTER_PORT=29500")
    cuda = _use_cuda(args)
    args.dist_backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank)
    print(f"| distributed init (rank {rank} of {world_size}, local {local_rank}): {dist_url} {args.dist_backend}",
          flush=True)
    dist.init_process_group(backend=args.dist_backend, init_method=dist_url, world_size=world_size, rank=rank)
    barrier()
    setup_for_distributed(rank == 0)


def setup_for_distributed(is_master: bool) -> None:
    """Silence print() on every rank but the master; print(..., force=True) always prints."""
    def rank_print(*args, force: bool = False, **kwargs):
        if is_master or force:
            _BUILTIN_PRINT(*args, **kwargs)

    builtins.print = rank_print


def is_dist_avail_and_initialized() -> bool:
    """True when a torch.distributed process group is running."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0, the only rank that writes checkpoints and logs."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if not is_dist_avail_and_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (identity without a process group) and return it."""
    if is_dist_avail_and_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _reduce_device() -> torch.device:
    if is_dist_avail_and_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------
# Seeding
# ---------------------------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Seed Python `random`, numpy and torch (all devices); callers pass seed + rank (spec §13)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def worker_init_fn(worker_id: int) -> None:
    """DataLoader hook: seed numpy/random from torch's per-worker seed so augmentations differ across workers."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def get_rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states, for exact resume; loadable with torch.load(weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what get_rng_state() returned."""
    random.setstate(state["python"])
    npst = state["numpy"]
    if isinstance(npst, dict):
        npst = (npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                npst["cached_gaussian"])
    np.random.set_state(npst)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------

def _atomic_write(path: str, write: Callable[[io.BufferedWriter], Any]) -> None:
    """Write through a temporary file in the same folder, fsync, then rename: readers see old or new, never half."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    # Makes the rename itself durable; not supported on every OS/filesystem, hence best effort.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save that never leaves a partial file at `path`."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def atomic_write_json(obj: Any, path: str) -> None:
    """json.dump to `path` atomically (tensors and numpy values become numbers/lists)."""
    text = json.dumps(obj, indent=2, default=_json_default).encode()
    _atomic_write(path, lambda f: f.write(text))


def append_jsonl(path: str, record: dict) -> None:
    """Append one JSON line (e.g. per logged step or epoch) to `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")
        f.flush()


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------

class MetricTracker:
    """Weighted running means per key, kept as (count, total) so ranks can be merged exactly."""

    def __init__(self):
        self.counts: dict[str, float] = {}
        self.totals: dict[str, float] = {}

    def update(self, n: float = 1, **values) -> None:
        """Add each value with weight n (a 1-element tensor is accepted)."""
        for key, value in values.items():
            value = float(value.item() if isinstance(value, torch.Tensor) else value)
            self.counts[key] = self.counts.get(key, 0.0) + n
            self.totals[key] = self.totals.get(key, 0.0) + value * n

    def reset(self) -> None:
        """Forget everything (e.g. at the start of a logging interval)."""
        self.counts.clear()
        self.totals.clear()

    def synchronize(self) -> None:
        """Sum counts and totals over ranks (every rank must call it); a no-op without a process group."""
        if not is_dist_avail_and_initialized():
            return
        gathered: list = [None] * get_world_size()
        dist.all_gather_object(gathered, sorted(self.counts))
        keys = sorted(set().union(*gathered))  # a key logged on one rank only still lines up
        stats = torch.tensor([[self.counts.get(k, 0.0), self.totals.get(k, 0.0)] for k in keys],
                             dtype=torch.float64, device=_reduce_device()).reshape(-1, 2)
        all_reduce_sum(stats)
        for key, (count, total) in zip(keys, stats.tolist()):
            self.counts[key], self.totals[key] = count, total

    def summary(self) -> dict[str, float]:
        """Mean of every key (NaN for a key with zero weight)."""
        return {k: self.totals[k] / self.counts[k] if self.counts[k] else math.nan for k in self.counts}

    def __str__(self) -> str:
        return "  ".join(f"{k}: {v:.4g}" for k, v in self.summary().items())
