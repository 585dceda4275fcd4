"""Task wiring that more than one entry script shares: the pretraining loader (Pretrain.py, Pretrain_nlvr.py), train
or evaluate and report (every fine-tuning script), retrieval fine-tuning (Retrieval.py and Grounding.py train the same
model with the same loss) and the classification tasks (NLVR.py and VE.py)."""
from typing import NamedTuple, Optional

import torch

import utils
from dataset import build_collate_fn, create_dataset, create_loader, create_sampler, static_shape_options
from engine.loop import autocast, evaluate_only, fit
from engine.script import (build_task_model, device_of, eval_metrics, print_json, setup, text_weights, train_loader,
                           write_metrics)
from evaluation.classification import make_evaluate
from models import registry


def pretrain_loader(config, args, tokenizer):
    """(loader, sampler) over the pretraining pairs (also text-assignment pretraining's), seeded from --seed."""
    train_set = create_dataset('pretrain', config).train
    collate = build_collate_fn('pretrain', tokenizer, train=True, **static_shape_options(config))
    return train_loader(train_set, config, args, collate, config['batch_size'])


def train_or_evaluate(args, model, evaluate_fn, train_fn, report, select_key=None):
    """--evaluate: one evaluation pass; else `train_fn()` (returning a FitResult). Then `report(metrics, epoch,
    selected_by)` with the evaluated metrics, or those of the reported epoch (the best by `select_key`)."""
    if args.evaluate:
        report(evaluate_only(args, model, evaluate_fn), 0, None)
        return
    result = train_fn()
    best = result.reported
    report(eval_metrics(best), best['epoch'], select_key if result.best is not None else None)


# ---- retrieval (also the grounding training) ---------------------------------------------------------------------
def retrieval_step(model, batch, alpha):
    """One ITC + ITM step of the retrieval model on an (image, text, idx) batch."""
    image, text, idx = batch
    loss_ita, loss_itm = model(image, text, alpha=alpha, idx=idx)
    return {'loss_ita': loss_ita, 'loss_itm': loss_itm}


def fit_retrieval_model(args, config, model, loader, sampler, evaluate, select_key, batch_size, step=None):
    """Fine-tune the retrieval model with `fit` (`step`: the family's step, default ALBEF's `retrieval_step`);
    returns the FitResult (its `best` is the reported epoch)."""
    model.check_queue_divisible(batch_size * utils.get_world_size())
    return fit(args, config, model, loader, step or retrieval_step, evaluate_fn=evaluate, select_key=select_key,
               ramp_alpha=config.get('warm_up', True), train_sampler=sampler)


# ---- classification: NLVR2 and SNLI-VE ---------------------------------------------------------------------------
class TaskLoaders(NamedTuple):
    """Train/val/test loaders of a classification task and the training sampler."""

    train: Optional[torch.utils.data.DataLoader]
    val: torch.utils.data.DataLoader
    test: torch.utils.data.DataLoader
    train_sampler: Optional[torch.utils.data.Sampler]


def batch_sizes(config):
    """(train, eval) per-GPU batch sizes: batch_size_train/batch_size_test (VE) or one batch_size (NLVR2)."""
    train = config.get('batch_size_train', config.get('batch_size'))
    test = config.get('batch_size_test', config.get('batch_size'))
    if train is None or test is None:
        raise KeyError('the config needs batch_size (NLVR2) or batch_size_train and batch_size_test (SNLI-VE)')
    return train, test


def classification_loaders(task, config, tokenizer, args, with_train=True):
    """Loaders of `task` ('nlvr' or 've'): seeded shuffled train (drop_last), exactly-once val and test."""
    splits = create_dataset(task, config)
    world, rank = utils.get_world_size(), utils.get_rank()
    train_bs, test_bs = batch_sizes(config)
    static = static_shape_options(config)  # text bucketed to multiples of 8 under compile: true
    train, sampler = None, None
    if with_train:
        train, sampler = train_loader(splits.train, config, args,
                                      build_collate_fn(task, tokenizer, train=True, **static), train_bs)
    samplers = (create_sampler([splits.val, splits.test], [False, False], world, rank) if args.distributed
                else [None, None])
    val, test = create_loader([splits.val, splits.test], samplers, [test_bs, test_bs],
                              config.get('num_workers', 4), [False, False],
                              [build_collate_fn(task, tokenizer, train=False, **static)] * 2)
    return TaskLoaders(train, val, test, sampler)


def classification_step(unpack):
    """step_fn for fit: `unpack(batch)` -> (image, text, label); returns {'loss': ...}."""
    def step(model, batch, alpha):
        image, text, label = unpack(batch)
        return {'loss': model(image, text, label, alpha=alpha, train=True)}
    return step


def run_classification(args, task, unpack, *, ramp_default, names, keeps_initial_bert=None):
    """The whole of NLVR.py and VE.py: fine-tune `task` ('nlvr' or 've') with val/test accuracy every epoch and the
    best-val epoch reported, or evaluate only. `names`: how the paper calls (val, test), e.g. ('dev', 'test-P');
    `keeps_initial_bert(config, args)`: whether the model keeps a copy of the constructor's BERT weights past the
    checkpoint (so they must be read although the checkpoint has every text weight)."""
    config = setup(args)
    device = device_of(args)
    from models.tokenization import build_tokenizer
    tokenizer = build_tokenizer(args.text_encoder)
    loaders = classification_loaders(task, config, tokenizer, args, with_train=not args.evaluate)
    keeps = bool(keeps_initial_bert and keeps_initial_bert(config, args))
    model = build_task_model(config, task, args, text_encoder=text_weights(args, keeps)).to(device)
    evaluate = make_evaluate(unpack, {'val': loaders.val, 'test': loaders.test}, device,
                             lambda: autocast(device, config['precision']))

    make_step = registry.task_spec(config, task).make_step  # None: the model's forward (ALBEF's call signature)
    step = classification_step(unpack) if make_step is None else make_step(config, device)

    def train():
        return fit(args, config, model, loaders.train, step, evaluate_fn=evaluate,
                   select_key='val_acc', ramp_alpha=config.get('warm_up', ramp_default),
                   train_sampler=loaders.train_sampler)

    def report(metrics, epoch, selected_by):
        write_metrics(args, config, task, metrics, epoch=epoch, selected_by=selected_by)
        print_json(metrics)
        if utils.is_main_process() and 'val_acc' in metrics:
            which = f'best {names[0]} epoch {epoch}' if selected_by else f'epoch {epoch}'
            print(f'{which}: {names[0]} {100 * metrics["val_acc"]:.2f}%, {names[1]} {100 * metrics["test_acc"]:.2f}%')

    train_or_evaluate(args, model, evaluate, train, report, select_key='val_acc')
