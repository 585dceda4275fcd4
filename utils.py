"""Shared helpers below the engine: distributed set-up and collectives, seeding and RNG state, atomic files, metrics.

Every distributed helper lives here once; without a process group each one is the single-process identity.
"""
from __future__ import annotations

import builtins
import contextlib
import io
import json
import math
import os
import random
import tempfile
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))

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


def collective_device() -> torch.device:
    """The device collectives of this process group run on (the local GPU under NCCL, else the CPU)."""
    if is_dist_avail_and_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(value: float) -> float:
    """`value` summed over every rank (itself without a process group)."""
    if not is_dist_avail_and_initialized():
        return value
    total = torch.tensor([float(value)], dtype=torch.float64, device=collective_device())
    dist.all_reduce(total)
    return total.item()


def gather_from_ranks(obj: Any) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] without a process group)."""
    if not is_dist_avail_and_initialized():
        return [obj]
    gathered: list = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_objects(items) -> list:
    """The list `items` of every rank concatenated in rank order; `items` itself without a process group."""
    return [x for part in gather_from_ranks(list(items)) for x in part]


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not is_dist_avail_and_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# ---------------------------------------------------------------------------------------------------------------
# Seeding
# ---------------------------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Seed Python `random`, numpy and torch (all devices); callers pass seed + rank."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def atomic_write_bytes(data: bytes, path: str) -> None:
    """Write `data` to `path` atomically."""
    _atomic_write(path, lambda f: f.write(data))


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


def plain_json(obj: Any) -> Any:
    """`obj` with numpy and tensor scalars turned into Python numbers (what JSON and weights-only loading accept)."""
    return json.loads(json.dumps(obj, default=_json_default))


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
                             dtype=torch.float64, device=collective_device()).reshape(-1, 2)
        all_reduce_sum(stats)
        for key, (count, total) in zip(keys, stats.tolist()):
            self.counts[key], self.totals[key] = count, total

    def summary(self) -> dict[str, float]:
        """Mean of every key (NaN for a key with zero weight)."""
        return {k: self.totals[k] / self.counts[k] if self.counts[k] else math.nan for k in self.counts}

    def __str__(self) -> str:
        return "  ".join(f"{k}: {v:.4g}" for k, v in self.summary().items())
