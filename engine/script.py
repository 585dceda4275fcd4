"""The contract every entry script follows: its arguments, the set-up, the training loader, which BERT weights to
read, building the task model through the registry, and the metrics.json that describes the run.

An entry script is then: `parser()`, `main(args)` = setup, data, `build_task_model`, `fit` or `evaluate_only`,
`write_metrics`, `destroy`.
"""
import argparse
import json
import os

import torch

import utils
from dataset import create_loader, create_sampler
from engine.checkpoints import resolve_auto_resume
from engine.config import load_config, save_config
from models import registry

DEFAULT_TEXT_ENCODER = 'bert-base-uncased'


# ---- arguments and set-up ----------------------------------------------------------------------------------------
def base_parser(description, config, output_dir):
    """The official command-line arguments (with `type=bool` fixed) plus --opt overrides and --precision."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument('--config', default=config)
    p.add_argument('--output_dir', default=output_dir)
    p.add_argument('--checkpoint', default='', help='weights to start from (pretrained or fine-tuned)')
    p.add_argument('--resume', nargs='?', const='last', default=None,
                   help="continue a run: bare flag = <output_dir>/checkpoint_last.pth (or the --checkpoint file); "
                        "'auto' = the newest intact checkpoint in output_dir, falling back past corrupt ones and "
                        "starting fresh when there is none (implied after a torchrun restart); or a path")
    p.add_argument('--text_encoder', default=None,
                   help="local BERT folder or a name in the local HF cache; 'none' = random init "
                        f"(default: the config key text_encoder, else {DEFAULT_TEXT_ENCODER})")
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--seed', default=42, type=int)
    p.add_argument('--world_size', default=1, type=int, help='set by torchrun/SLURM; kept for compatibility')
    p.add_argument('--dist_url', default='env://')
    p.add_argument('--distributed', action=argparse.BooleanOptionalAction, default=True,
                   help='use the launcher environment when present (default); --no-distributed forces one process')
    p.add_argument('--opt', action='append', default=[], metavar='KEY=VALUE',
                   help='override a config key, dotted for nested keys (repeatable), e.g. optimizer.lr=2e-4')
    p.add_argument('--precision', choices=['fp32', 'bf16', 'fp16'], default=None,
                   help='fp32 (ALBEF official), bf16 autocast, or fp16 autocast with a dynamic loss scaler (VLMo '
                        'official); default: the config key precision, else fp32')
    p.add_argument('--trust_checkpoint', action='append', default=[], metavar='PATH',
                   help='allow full unpickling (which can run code) of this checkpoint file when weights-only '
                        'loading rejects it; only for files you trust (repeatable)')
    return p


def setup(args):
    """Distributed init, config (with overrides), determinism, seeds, output folder; returns the config dict."""
    if (int(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') or 0) > 0
            and os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True'):
        print('warning: this torchrun restart shares the rendezvous store of the failed attempt, whose stale '
              'addresses can make the process-group set-up fail (pytorch/pytorch#135712); launch torchrun with '
              'TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the environment', flush=True)
    config = load_config(args.config, args.opt)
    apply_determinism(config)  # before CUDA or the process group start: cuBLAS reads its setting once
    utils.init_distributed_mode(args)
    if args.precision:
        config['precision'] = args.precision
    if args.text_encoder is None:
        args.text_encoder = config.get('text_encoder') or DEFAULT_TEXT_ENCODER
    trust_checkpoints(getattr(args, 'trust_checkpoint', []))
    utils.seed_everything(args.seed + utils.get_rank())
    if args.device.startswith('cuda') and not config.get('deterministic'):
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True  # the official A100 runs used TF32 (torch 1.8 default)
        torch.backends.cudnn.allow_tf32 = True
    os.makedirs(args.output_dir, exist_ok=True)
    resolve_auto_resume(args)  # before the script builds its model: it starts differently when resuming
    if utils.is_main_process():
        save_config(config, os.path.join(args.output_dir, 'config.yaml'))
    return config


def apply_determinism(config):
    """`deterministic: true`: deterministic kernels everywhere (an op without one raises) and the settings CUDA needs.

    Same config, seed, thread count, worker count and hardware then give bit-identical runs and resumes (README,
    "Reproducible runs"). cuDNN autotuning and TF32 stay off.
    """
    if not config.get('deterministic'):
        return
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def trust_checkpoints(paths):
    """Let models.checkpoint unpickle these files in full (code execution) when weights-only loading fails."""
    from models.checkpoint import trust_checkpoint_file
    for path in paths:
        trust_checkpoint_file(path)


def device_of(args):
    """torch.device for this process (the local GPU under torchrun)."""
    if args.device.startswith('cuda') and getattr(args, 'gpu', None) is not None:
        return torch.device('cuda', args.gpu)
    return torch.device(args.device)


def wrap_ddp(model, args, find_unused_parameters=False):
    """DDP over the task model when distributed; returns (model, model_without_ddp).

    Buffers are not re-broadcast every step: the queues are updated identically on every rank from all-gathered
    features, and DDP already syncs every buffer from rank 0 at construction.
    """
    if not getattr(args, 'distributed', False):
        return model, model
    device_ids = [args.gpu] if next(model.parameters()).is_cuda else None
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False,
                                                    find_unused_parameters=find_unused_parameters)
    return ddp, model


def destroy():
    """Tear down the process group, if any."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---- data and model ----------------------------------------------------------------------------------------------
def train_loader(dataset, config, args, collate_fn, batch_size):
    """(loader, sampler) for training: a DistributedSampler seeded from --seed even in one process, so the data
    order is a function of (seed, epoch) and a resumed run continues exactly where it stopped."""
    world, rank = utils.get_world_size(), utils.get_rank()
    sampler = create_sampler([dataset], [True], world, rank, seed=args.seed)[0]
    loader = create_loader([dataset], [sampler], [batch_size], [config.get('num_workers', 4)], [True], [collate_fn],
                           seed=args.seed + rank)[0]
    return loader, sampler


def text_weights(args, keeps_initial_copy=False):
    """The BERT weights a task model reads at construction: none when a --checkpoint or --resume overwrites every
    text weight, unless the official recipe keeps a copy of the constructor's weights (`keeps_initial_copy`)."""
    if (args.checkpoint or args.resume) and not keeps_initial_copy:
        return None
    return args.text_encoder


def require_task(args, task):
    """Stop before any data is read when the config's model family has no `task` model (VLMo, for example, defines
    no SNLI-VE, grounding or NLVR2 TA-pretraining recipe: docs/README_vlmo.md)."""
    config = load_config(args.config, args.opt)
    try:
        registry.task_spec(config, task)
    except ValueError as err:
        raise SystemExit(f'{args.config}: {err}') from None


def start_checkpoint(config, task, args):
    """The file a run starts from: --checkpoint, else the one the family's config names (TaskSpec.init_checkpoint,
    e.g. VLMo's vlmo.init.*), else None."""
    if args.checkpoint:
        return args.checkpoint
    spec = registry.task_spec(config, task)
    return spec.init_checkpoint(config) if spec.init_checkpoint else None


def build_task_model(config, task, args, **kwargs):
    """The config's model family's `task` model (models/registry.py), started from --checkpoint (or the file the
    family's config names, TaskSpec.init_checkpoint) unless resuming."""
    spec = registry.task_spec(config, task)
    model = spec.build(config, **kwargs)
    start = start_checkpoint(config, task, args)
    if start and args.resume is None:
        spec.load_checkpoint(model, start, config)
    return model


# ---- results -----------------------------------------------------------------------------------------------------
def write_metrics(args, config, task, metrics, *, epoch, selected_by=None, **extra):
    """output_dir/metrics.json describing this run only: task, model, config, checkpoint, whether it only evaluated,
    the epoch the numbers come from (the best one where `selected_by` names the selection metric), the flat metrics
    and any task-specific protocol fields (`extra`). `checkpoint` is the start file (--checkpoint, or the one the
    config names: start_checkpoint), '' when the run started from random or --text_encoder weights."""
    if not utils.is_main_process():
        return None
    summary = {'task': task, 'model': registry.model_family(config), 'config': args.config,
               'checkpoint': start_checkpoint(config, task, args) or '',
               'evaluate_only': bool(getattr(args, 'evaluate', False)),
               'resumed_from': args.resume or None, 'epoch': epoch, 'selected_by': selected_by,
               'metrics': {k: v for k, v in metrics.items() if k != 'epoch' and isinstance(v, (int, float))}}
    summary.update(extra)
    path = os.path.join(args.output_dir, 'metrics.json')
    utils.atomic_write_json(summary, path)
    return summary


def eval_metrics(record):
    """The evaluation metrics of an epoch record (its train_* averages and the epoch number left out)."""
    return {k: v for k, v in (record or {}).items() if not k.startswith('train_') and k != 'epoch'}


def print_json(record):
    """Print a result dict as one JSON line on the main process."""
    if utils.is_main_process():
        print(json.dumps(record))


def save_result(result, result_dir, filename, merge=None):
    """Write this rank's `<filename>_rank<r>.json`, then the all-rank `<filename>.json` on rank 0.

    `merge` (e.g. deduplication) is applied to the concatenated list. Ranks exchange results in memory, so no
    shared file system is needed. Returns (path, merged list) on rank 0 and (None, None) elsewhere.
    """
    os.makedirs(result_dir, exist_ok=True)
    utils.atomic_write_json(result, os.path.join(result_dir, f'{filename}_rank{utils.get_rank()}.json'))
    merged = utils.gather_objects(result)
    path = None
    if utils.is_main_process():
        merged = merge(merged) if merge else merged
        path = os.path.join(result_dir, f'{filename}.json')
        utils.atomic_write_json(merged, path)
        print(f'result file saved to {path}')
    utils.barrier()
    return (path, merged) if utils.is_main_process() else (None, None)
