"""Pretrain.py as a user runs it: one process, resume from checkpoint_last.pth, two processes under torchrun (gloo),
and a corrupt image stopping the run with its path and index named."""
import json
import shutil

import pytest
import torch

from dataset.image_io import ImageLoadError
from tests.helpers import make_world, pretrain_argv, run_main, run_script

# a very short CPU run on the small world; mechanics only: a random ViT (no deit given: init_deit false)
TINY_RUN = {'num_workers': 0, 'batch_size': 4, 'queue_size': 32, 'max_steps_per_epoch': 3, 'schedular.epochs': 2,
            'log_every': 1}


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp('world'), scale=0.05, seed=0)


def tiny_args(root, out, *extra):
    """Command-line arguments of a very short CPU run on the small world."""
    return pretrain_argv(root, out, seed=3, **TINY_RUN) + list(extra)


def run_pretrain(argv):
    run_main('Pretrain', argv)


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.startswith('{')]


def test_resume_continues_the_same_run(world, tmp_path):
    full = tmp_path / 'full'
    run_pretrain(tiny_args(world, full))
    assert sorted(p.name for p in full.glob('checkpoint_*.pth')) == ['checkpoint_00.pth', 'checkpoint_01.pth',
                                                                    'checkpoint_last.pth']
    assert not list(full.glob('*.tmp')), 'a temporary checkpoint file was left behind'
    # an interrupted run: only epoch 0 finished; resume it with the bare --resume flag
    cut = tmp_path / 'cut'
    cut.mkdir()
    shutil.copy(full / 'checkpoint_00.pth', cut / 'checkpoint_last.pth')
    run_pretrain(tiny_args(world, cut, '--resume'))
    a = torch.load(full / 'checkpoint_01.pth', weights_only=False)
    b = torch.load(cut / 'checkpoint_01.pth', weights_only=False)
    assert a['epoch'] == b['epoch'] == 1
    assert b['lr_scheduler']['last_t'] == a['lr_scheduler']['last_t']
    for key, value in a['model'].items():
        assert torch.allclose(value.float(), b['model'][key].float(), atol=1e-6), key
    full_log, cut_log = read_log(full / 'log.txt'), read_log(cut / 'log.txt')
    assert cut_log[-1]['epoch'] == 1
    assert cut_log[-1]['train_lr'] == pytest.approx(full_log[-1]['train_lr'])
    assert cut_log[-1]['train_loss_ita'] == pytest.approx(full_log[-1]['train_loss_ita'], abs=1e-5)


def test_resume_refuses_a_weights_only_file(world, tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    torch.save({'temp': torch.tensor(0.07)}, out / 'weights.pth')
    from models.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match='not a training checkpoint'):
        run_pretrain(tiny_args(world, out, '--resume', str(out / 'weights.pth')))


def test_corrupt_image_stops_with_path_and_index(world, tmp_path):
    items = json.load(open(world / 'pretrain.json'))[:8]
    bad = tmp_path / 'broken.jpg'
    bad.write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
    items[2] = {'image': str(bad), 'caption': 'a red circle'}
    ann = tmp_path / 'ann.json'
    ann.write_text(json.dumps(items))
    argv = tiny_args(world, tmp_path / 'out', '--opt', f'train_file=[{ann}]', '--opt', 'schedular.epochs=1')
    with pytest.raises(ImageLoadError) as err:
        run_pretrain(argv)
    assert str(bad) in str(err.value) and 'index 2' in str(err.value)


def test_two_process_torchrun(world, tmp_path):
    out = tmp_path / 'ddp'
    proc = run_script('Pretrain.py', tiny_args(world, out, '--opt', 'schedular.epochs=1'), nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / 'checkpoint_last.pth', weights_only=False)
    steps, world_size, batch = 3, 2, 4
    assert int(ckpt['model']['queue_ptr']) == steps * world_size * batch
    log = read_log(out / 'log.txt')
    assert log[-1]['epoch'] == 0 and log[-1]['train_samples_per_s'] > 0


def test_lr_mult_visual_zero_keeps_the_image_encoder_as_it_started(world, tmp_path):
    """`lr_mult_visual: 0` (not official; docs/README_synthetic.md, ninth round) freezes the ViT through the epoch
    scheduler and its warm-up; the rest of the model still learns."""
    out = tmp_path / 'frozen'
    run_pretrain(tiny_args(world, out, '--opt', 'lr_mult_visual=0'))
    first = torch.load(out / 'checkpoint_00.pth', weights_only=False)
    last = torch.load(out / 'checkpoint_01.pth', weights_only=False)
    visual = [k for k in first['model'] if k.startswith('visual_encoder.')]
    assert visual and all(torch.equal(first['model'][k], last['model'][k]) for k in visual)
    assert not torch.equal(first['model']['text_proj.weight'], last['model']['text_proj.weight'])
    assert [g.get('lr_mult') for g in last['optimizer']['param_groups']] == [None, None, 0.0, 0.0]
