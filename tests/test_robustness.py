"""Faults that lose nothing: a SIGKILLed pretraining run resumes to the same weights, corrupt checkpoints are named
and skipped by --resume auto, non-finite losses stop (or are skipped and counted), unreadable images are counted in
the logs, bad configs stop before training, and torchrun --max-restarts resumes a job one of whose ranks died."""
import argparse
import json
import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import engine
from dataset import create_loader, create_sampler
from models.checkpoint import CheckpointError
from tests import helpers
from engine.config import ConfigError

CONFIG = helpers.PRETRAIN_CONFIG
# a short CPU pretraining run on the small world, from a random ViT (no deit given: init_deit false)
SHORT_RUN = {'num_workers': 0, 'batch_size': 4, 'queue_size': 32, 'max_steps_per_epoch': 5, 'schedular.epochs': 2,
             'log_every': 1}


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    return helpers.make_world(tmp_path_factory.mktemp('world'), scale=0.05, seed=0)


def pretrain_argv(root, out, **overrides):
    """Arguments of a short CPU pretraining run on the small world (overrides are --opt keys)."""
    return helpers.pretrain_argv(root, out, seed=5, **{**SHORT_RUN, **overrides})


def run_pretrain(argv):
    helpers.run_main('Pretrain', argv)


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.startswith('{')]


def assert_same_training_state(a_path, b_path):
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    assert a['epoch'] == b['epoch'] and a['global_step'] == b['global_step']
    for key, value in a['model'].items():
        assert torch.equal(value, b['model'][key]), f'model {key} differs'
    for pid, state in a['optimizer']['state'].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b['optimizer']['state'][pid][name])), name
    assert a['lr_scheduler'] == b['lr_scheduler']


def wait_for(path, proc, timeout=240):
    """Poll until `path` exists; fail if the process ends first."""
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, f'the run ended (rc {proc.returncode}) before {path} was written'
        assert time.time() < deadline, f'{path} did not appear within {timeout} s'
        time.sleep(0.01)


def corrupt_middle(path):
    data = bytearray(open(path, 'rb').read())
    data[len(data) // 2: len(data) // 2 + 64] = os.urandom(64)
    with open(path, 'wb') as f:
        f.write(data)


def truncate_half(path):
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)


# ---- killed mid-epoch, resumed exactly ---------------------------------------------------------------------------
def test_sigkill_mid_epoch_then_resume_auto_gives_the_same_weights(world, tmp_path, capsys):
    steps = {'checkpoint_every_steps': 2}
    full = tmp_path / 'full'
    run_pretrain(pretrain_argv(world, full, **steps))
    # 5 steps per epoch, a step checkpoint every 2 steps (not at an epoch's end), the newest 2 step files kept
    assert sorted(p.name for p in full.glob('checkpoint_*.pth')) == [
        'checkpoint_00.pth', 'checkpoint_01.pth', 'checkpoint_01_step000002.pth', 'checkpoint_01_step000004.pth',
        'checkpoint_last.pth']

    cut = tmp_path / 'cut'
    proc = helpers.start_forked('Pretrain.py', pretrain_argv(world, cut, **steps), tmp_path / 'killed.log')
    try:
        wait_for(cut / 'checkpoint_01_step000002.pth', proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (cut / 'checkpoint_01.pth').exists(), 'the run finished before it was killed'

    # a second copy whose two newest files are damaged: --resume auto must fall back to checkpoint_00.pth
    damaged = tmp_path / 'damaged'
    shutil.copytree(cut, damaged)
    corrupt_middle(damaged / 'checkpoint_01_step000002.pth')
    truncate_half(damaged / 'checkpoint_last.pth')

    capsys.readouterr()
    run_pretrain(pretrain_argv(world, cut, **steps) + ['--resume', 'auto'])
    out = capsys.readouterr().out
    assert f'resumed from {cut / "checkpoint_01_step000002.pth"} (epoch 1 step 2)' in out
    assert_same_training_state(full / 'checkpoint_01.pth', cut / 'checkpoint_01.pth')
    full_log, cut_log = read_log(full / 'log.txt'), read_log(cut / 'log.txt')
    for key in ('train_loss_ita', 'train_loss_itm', 'train_loss_mlm', 'train_lr'):
        assert cut_log[-1][key] == full_log[-1][key], key  # running averages were restored too

    run_pretrain(pretrain_argv(world, damaged, **steps) + ['--resume', 'auto'])
    out = capsys.readouterr().out
    assert 'skipping' in out and 'CRC-32' in out and 'truncated or corrupt' in out
    assert f'resumed from {damaged / "checkpoint_00.pth"} (epoch 0)' in out
    assert_same_training_state(full / 'checkpoint_01.pth', damaged / 'checkpoint_01.pth')
    assert not list(damaged.glob('.*.tmp')) and not list(damaged.glob('*.tmp'))


# ---- a small model for the fault tests ---------------------------------------------------------------------------
TOY_CONFIG = {'optimizer': {'opt': 'adamW', 'lr': 0.01, 'weight_decay': 0.0},
              'schedular': {'sched': 'cosine', 'lr': 0.01, 'epochs': 2, 'min_lr': 1e-4, 'decay_rate': 1,
                            'warmup_lr': 1e-4, 'warmup_epochs': 1, 'cooldown_epochs': 0},
              'warmup_step_size': 1, 'log_every': 1}


def toy_fit(out, nan_calls=(), resume=None, **config):
    """engine.fit on a linear model with 8 steps per epoch; the loss is NaN on the given (0-based) calls."""
    argv = ['--output_dir', str(out), '--device', 'cpu', '--seed', '1'] + (['--resume', resume] if resume else [])
    args = engine.base_parser('toy', None, str(out)).parse_args(argv)
    args.distributed = False
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    sampler = create_sampler([data], [True], 1, 0, seed=1)[0]
    loader = create_loader([data], [sampler], [4], [0], [True], [None], seed=1)[0]
    calls = []

    def step(model, batch, alpha):
        loss = torch.nn.functional.mse_loss(model(batch[0]), batch[1])
        calls.append(len(calls))
        return {'loss': loss * float('nan') if calls[-1] in nan_calls else loss}

    model = torch.nn.Linear(4, 1)
    records = engine.fit(args, {**TOY_CONFIG, **config}, model, loader, step, train_sampler=sampler).records
    return model, records


@pytest.mark.unit
def test_nonfinite_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError) as err:
        toy_fit(tmp_path / 'out', nan_calls={5}, checkpoint_every_steps=2)
    message = str(err.value)
    assert 'epoch 0 step 5' in message and 'global step 5' in message
    assert str(tmp_path / 'out' / 'checkpoint_00_step000004.pth') in message
    assert 'skip_nonfinite_steps' in message and '--resume auto' in message


@pytest.mark.unit
def test_nonfinite_steps_can_be_skipped_and_counted(tmp_path):
    model, records = toy_fit(tmp_path / 'out', nan_calls={3, 9}, skip_nonfinite_steps=2)
    assert [r['train_nonfinite_skipped'] for r in records] == [1, 2]  # running count over the run
    assert all(torch.isfinite(p).all() for p in model.parameters())
    steps = read_log(tmp_path / 'out' / 'train_steps.jsonl')
    assert steps[-1]['nonfinite_skipped'] == 2
    with pytest.raises(FloatingPointError, match='after 1 skipped steps'):
        toy_fit(tmp_path / 'again', nan_calls={3, 9}, skip_nonfinite_steps=1)


@pytest.mark.unit
def test_resume_from_a_damaged_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / 'out'
    toy_fit(out, checkpoint_every_steps=3)
    truncate_half(out / 'checkpoint_00.pth')
    with pytest.raises(CheckpointError, match='truncated or corrupt.*earlier checkpoint'):
        toy_fit(out, resume=str(out / 'checkpoint_00.pth'))
    corrupt_middle(out / 'checkpoint_01_step000006.pth')
    with pytest.raises(CheckpointError, match='is corrupt.*earlier checkpoint'):
        toy_fit(out, resume=str(out / 'checkpoint_01_step000006.pth'))
    # --resume auto takes the newest intact file (checkpoint_last.pth is the same file as checkpoint_01.pth) ...
    assert engine.find_latest_checkpoint(str(out)) == str(out / 'checkpoint_01.pth')
    os.remove(out / 'checkpoint_last.pth')
    os.remove(out / 'checkpoint_01.pth')
    # ... and falls back past the damaged ones
    assert engine.find_latest_checkpoint(str(out)) == str(out / 'checkpoint_01_step000003.pth')


@pytest.mark.unit
def test_resume_auto_in_an_empty_folder_starts_a_new_run(tmp_path):
    _, records = toy_fit(tmp_path / 'out', resume='auto')
    assert [r['epoch'] for r in records] == [0, 1]


class NoisyData(torch.utils.data.Dataset):
    """Items that draw from torch and numpy like an augmentation does."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return torch.tensor([float(i)]) + torch.rand(1) + float(np.random.rand())


@pytest.mark.unit
def test_data_seed_per_step_makes_a_resumed_epoch_exact_with_workers():
    data = NoisyData()

    def epoch(workers, start):
        sampler = create_sampler([data], [True], 1, 0, seed=2)[0]
        loader = create_loader([data], [sampler], [4], [workers], [True], [None], seed=2)[0]
        return list(engine.EpochData(loader, sampler, 2, {'data_seed_per_step': True}).for_epoch(1, start))

    full, resumed, in_process = epoch(2, 0), epoch(2, 3), epoch(0, 0)
    assert len(full) == 10 and len(resumed) == 7
    assert all(torch.equal(a, b) for a, b in zip(full[3:], resumed))
    assert all(torch.equal(a, b) for a, b in zip(full, in_process))  # nor does the worker count matter


# ---- unreadable images and bad configs ---------------------------------------------------------------------------
def test_skipped_images_are_counted_in_the_logs(world, tmp_path):
    items = json.load(open(world / 'pretrain.json'))[:8]
    bad = tmp_path / 'broken.jpg'
    bad.write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
    items[2] = {'image': str(bad), 'caption': 'a red circle'}
    ann = tmp_path / 'ann.json'
    ann.write_text(json.dumps(items))
    out = tmp_path / 'out'
    # 8 items, 2 batches of 4: the broken image is met exactly once, in a DataLoader worker process
    run_pretrain(pretrain_argv(world, out, train_file=f'[{ann}]', skip_bad_images='true', num_workers=1,
                               **{'schedular.epochs': 1}))
    assert read_log(out / 'log.txt')[-1]['train_skipped_images'] == 1
    assert read_log(out / 'train_steps.jsonl')[-1]['skipped_images'] == 1


def assert_stopped_before_training(out):
    assert not os.path.exists(out / 'train_steps.jsonl') and not list(out.glob('checkpoint_*'))


def test_unknown_config_key_stops_before_training_with_suggestions(world, tmp_path):
    out = tmp_path / 'out'
    with pytest.raises(ConfigError, match="unknown config key 'checkpoint_every_step'.*checkpoint_every_steps"):
        run_pretrain(pretrain_argv(world, out, checkpoint_every_step=2))
    config = tmp_path / 'typo.yaml'
    config.write_text(open(CONFIG).read().replace('queue_size:', 'quene_size:'))
    with pytest.raises(ConfigError, match=f"{config}: unknown config key 'quene_size'.*queue_size"):
        run_pretrain(pretrain_argv(world, out) + ['--config', str(config)])
    assert_stopped_before_training(out)


def test_missing_files_stop_before_training(world, tmp_path):
    out = tmp_path / 'out'
    with pytest.raises(ConfigError, match='nowhere.yaml.*does not exist'):
        run_pretrain(pretrain_argv(world, out) + ['--config', str(tmp_path / 'nowhere.yaml')])
    with pytest.raises(FileNotFoundError, match='missing.json.*train_file'):
        run_pretrain(pretrain_argv(world, out, train_file=f'[{tmp_path}/missing.json]'))
    with pytest.raises(ValueError, match='train_shards.*no_shards'):
        run_pretrain(pretrain_argv(world, out, train_shards=str(tmp_path / 'no_shards' / 'shard-{0..3}.tar')))
    assert_stopped_before_training(out)


# ---- torchrun restarts a job whose rank died -----------------------------------------------------------------------
def worker_pid(agent_pid, rank):
    """PID of the torchrun worker with RANK=rank (a child of the agent process), or None."""
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat') as f:
                parent = int(f.read().rsplit(')', 1)[1].split()[1])
            if parent != agent_pid:
                continue
            with open(f'/proc/{entry}/environ', 'rb') as f:
                if f'RANK={rank}'.encode() in f.read().split(b'\0'):
                    return int(entry)
        except (OSError, IndexError, ValueError):
            continue
    return None


@pytest.mark.skipif(not os.path.isdir('/proc'), reason='finds the worker processes through /proc')
def test_torchrun_max_restarts_resumes_after_a_rank_is_killed(world, tmp_path):
    out = tmp_path / 'ddp'
    with open(tmp_path / 'torchrun.log', 'w') as log:
        # a fresh rendezvous store per attempt: the shared one keeps the dead attempt's addresses (pytorch#135712)
        proc = helpers.start_script('Pretrain.py', pretrain_argv(world, out, checkpoint_every_steps=2,
                                                                 max_steps_per_epoch=4), log, nproc=2,
                                    launcher_args=['--max-restarts=1', '--monitor-interval=0.2'],
                                    env={'TORCH_DISABLE_SHARE_RDZV_TCP_STORE': '1'})
        try:
            wait_for(out / 'checkpoint_00_step000002.pth', proc)
            victim = worker_pid(proc.pid, 1)
            assert victim is not None, 'rank 1 not found among the torchrun workers'
            os.kill(victim, signal.SIGKILL)
            rc = proc.wait(timeout=400)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = (tmp_path / 'torchrun.log').read_text()
    assert rc == 0, text[-3000:]
    assert 'torchrun restart 1' in text and 'resumed from' in text
    ckpt = torch.load(out / 'checkpoint_last.pth', weights_only=True)
    assert ckpt['epoch'] == 1 and ckpt.get('step_in_epoch') is None and ckpt['global_step'] == 8
    assert ckpt['world_size'] == 2 and len(ckpt['per_rank']) == 2
    assert [r['epoch'] for r in read_log(out / 'log.txt')] == [0, 1]


@pytest.mark.unit
def test_only_loss_entries_of_a_step_are_optimised_the_others_are_logged(tmp_path):
    from engine.loop import total_loss
    out = {'loss_a': torch.tensor(1.5), 'loss_b': torch.tensor(2.0), 'codes_used': torch.tensor(7.0)}
    assert float(total_loss(out)) == 3.5


@pytest.mark.unit
def test_checkpoints_with_numpy_metrics_load_weights_only(tmp_path):
    import numpy as np
    from models.checkpoint import load_checkpoint_file
    out = tmp_path / 'out'
    args = argparse.Namespace(output_dir=str(out), seed=0, resume=None, checkpoint='', distributed=False,
                              device='cpu')
    os.makedirs(out)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    from engine.checkpoints import TrainingRun
    from scheduler import create_scheduler
    scheduler = create_scheduler(TOY_CONFIG['schedular'], optimizer)
    run = TrainingRun(args, TOY_CONFIG, model, optimizer, scheduler, select_key='val_acc')
    run.end_epoch(0, {'val_acc': np.float64(0.5), 'zeroshot_txt_r1': np.float32(3.0), 'epoch': 0})
    ckpt = load_checkpoint_file(str(out / 'checkpoint_last.pth'))  # weights_only=True: no numpy scalar inside
    assert ckpt['best_record'] == {'val_acc': 0.5, 'zeroshot_txt_r1': 3.0, 'epoch': 0}
