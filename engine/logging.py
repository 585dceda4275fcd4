"""What a run shows while it trains: the tqdm bar, one JSON line per logged step (train_steps.jsonl) with losses,
learning rate, throughput, data-wait time and peak memory, the epoch summary, and optional TensorBoard scalars."""
import os
import time

import torch
from tqdm import tqdm

import utils


class StepLog:
    """Per-step and per-epoch logging of one run on the main process (`output_dir` None: bar and summary only)."""

    def __init__(self, output_dir, config, device):
        """Write `output_dir`/train_steps.jsonl every `log_every` steps; TensorBoard events with `tensorboard: true`."""
        self.path = os.path.join(output_dir, 'train_steps.jsonl') if output_dir else None
        self.every, self.device = int(config.get('log_every', 50)), device
        self.main = utils.is_main_process()
        self.events = None
        if output_dir and config.get('tensorboard') and self.main:
            from reproduce.events import EventWriter  # written by hand: no tensorboard package needed
            self.events = EventWriter(os.path.join(output_dir, 'tensorboard'))
        self.global_step = 0

    def start_epoch(self, epoch, steps, start_step, counting=False):
        """Reset the epoch's counters; `counting`: the data skips unreadable images and reports how many."""
        self.epoch, self.steps, self.counting = epoch, steps, counting
        self.bar = tqdm(total=steps, initial=start_step, desc=f'epoch {epoch}', disable=not self.main,
                        dynamic_ncols=True)
        self.t_epoch = self.t_last = time.time()
        self.data_wait, self.samples = 0.0, 0

    def count(self, batch):
        """Add a batch to the throughput count (every rank's share); returns its local size."""
        first = batch
        while isinstance(first, (list, tuple, dict)):  # the first tensor (SIMLA's image column is a list of views)
            first = first[0] if isinstance(first, (list, tuple)) else next(iter(first.values()))
        n = int(first.shape[0])
        self.samples += n * utils.get_world_size()
        return n

    def step(self, i, loss_dict, optimizer, run):
        """Advance the bar; every `log_every` steps (and at the epoch's last) write one JSON line."""
        if not self.main:
            return
        self.bar.update(1)
        if (i + 1) % self.every and i + 1 != self.steps:
            return
        now = time.time()
        rate = self.samples / max(now - self.t_epoch, 1e-9)
        self.bar.set_postfix({k: f'{v.item():.3f}' for k, v in loss_dict.items()} | {'samples/s': f'{rate:.1f}'})
        record = {'epoch': self.epoch, 'step': i, 'lr': optimizer.param_groups[0]['lr'],
                  'samples_per_s': round(rate, 2), 'data_wait_s': round(self.data_wait, 3),
                  'interval_s': round(now - self.t_last, 3)}
        record.update({k: round(v.item(), 5) for k, v in loss_dict.items()})
        if getattr(run.scheduler, 'per_optimizer_step', False):  # the step schedule: optimizer steps taken so far
            record['opt_step'] = run.scheduler.optimizer_step
        if self.device.type == 'cuda':
            record['peak_mem_gb'] = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 30, 2)
        if self.counting:
            record['skipped_images'] = run.skipped_images
        if run.nonfinite_skipped:
            record['nonfinite_skipped'] = run.nonfinite_skipped
        if self.path:
            utils.append_jsonl(self.path, record)
        if self.events:
            self.events.add_scalars(run.global_step + 1, {f'train/{k}': v for k, v in record.items()
                                                          if k not in ('epoch', 'step')})
        self.t_last = now

    def end_epoch(self, stats, run):
        """Close the bar; the epoch's averages plus throughput, data wait, time and fault counts."""
        self.bar.close()
        elapsed = time.time() - self.t_epoch
        stats.update(samples_per_s=self.samples / max(elapsed, 1e-9), data_wait_s=self.data_wait,
                     epoch_time_s=elapsed)
        if self.counting:
            stats['skipped_images'] = int(utils.sum_over_ranks(run.skipped_images))
            if stats['skipped_images']:
                print(f'epoch {self.epoch}: skipped {stats["skipped_images"]} unreadable images (skip_bad_images)')
        if run.max_nonfinite:
            stats['nonfinite_skipped'] = run.nonfinite_skipped
        return stats

    def epoch_record(self, record):
        """TensorBoard scalars of an epoch record (evaluation metrics included)."""
        if self.events:
            self.events.add_scalars(record['epoch'], {f'epoch/{k}': v for k, v in record.items()
                                                      if k != 'epoch' and isinstance(v, (int, float))})
            self.events.flush()

    def close(self):
        """Flush and close the event file, if any."""
        if self.events:
            self.events.close()
