"""Training wiring two entry scripts share: image-text retrieval fine-tuning (Retrieval.py and Grounding.py train the
same model with the same loss) and the classification tasks (NLVR.py and VE.py: loaders, step, best-epoch report)."""
from typing import NamedTuple, Optional

import torch

import utils
from dataset import build_collate_fn, create_dataset, create_loader, create_sampler, static_shape_options
from engine.loop import fit
from engine.script import train_loader, write_metrics


# ---- retrieval (also the grounding training) ---------------------------------------------------------------------
def retrieval_step(model, batch, alpha):
    """One ITC + ITM step of the retrieval model on an (image, text, idx) batch."""
    image, text, idx = batch
    loss_ita, loss_itm = model(image, text, alpha=alpha, idx=idx)
    return {'loss_ita': loss_ita, 'loss_itm': loss_itm}


def fit_retrieval_model(args, config, model, loader, sampler, evaluate, select_key, batch_size):
    """Fine-tune the retrieval model with `fit`; returns the FitResult (its `best` is the reported epoch)."""
    model.check_queue_divisible(batch_size * utils.get_world_size())
    return fit(args, config, model, loader, retrieval_step, evaluate_fn=evaluate, select_key=select_key,
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


def report_classification(args, config, task, metrics, epoch, val_name, test_name, selected_by=None):
    """Print the val and test accuracy of the reported epoch and write metrics.json."""
    write_metrics(args, config, task, metrics, epoch=epoch, selected_by=selected_by)
    if utils.is_main_process() and 'val_acc' in metrics:
        which = f'best {val_name} epoch {epoch}' if selected_by else f'epoch {epoch}'
        print(f'{which}: {val_name} {100 * metrics["val_acc"]:.2f}%, {test_name} {100 * metrics["test_acc"]:.2f}%')
