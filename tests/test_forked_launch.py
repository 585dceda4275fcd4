"""The fork server of tests/helpers.py (run_forked / start_forked) runs an entry script as `python Script.py ...`
would: the learning margins measured with subprocess launches hold for forked ones only if both compute the same."""
import pytest
import torch

from synthetic.world import generate
from tests.helpers import pretrain_argv, run_forked, run_script


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp('forked_world')
    generate(root, seed=0, scale=0.05)
    return root


def test_a_forked_run_equals_a_subprocess_run_bit_for_bit(world, tmp_path):
    keys = {'num_workers': 1, 'batch_size': 4, 'queue_size': 16, 'max_steps_per_epoch': 3, 'schedular.epochs': 1,
            'log_every': 1}
    states, outputs = {}, {}
    for how, launch in (('subprocess', run_script), ('forked', run_forked)):
        out = tmp_path / how
        proc = launch('Pretrain.py', pretrain_argv(world, out, seed=3, **keys), timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        states[how] = torch.load(out / 'checkpoint_last.pth', map_location='cpu', weights_only=False)['model']
        outputs[how] = (out / 'train_steps.jsonl').read_text()
    assert states['subprocess'].keys() == states['forked'].keys()
    for key, value in states['subprocess'].items():
        assert torch.equal(value, states['forked'][key]), key
    assert '"loss_mlm"' in outputs['forked']
    strip = [line.split('"samples_per_s"')[0] for line in outputs['subprocess'].splitlines()]
    assert strip == [line.split('"samples_per_s"')[0] for line in outputs['forked'].splitlines()]


def test_a_failing_forked_run_reports_its_exit_code_and_error(tmp_path):
    proc = run_forked('Pretrain.py', ['--config', str(tmp_path / 'absent.yaml'), '--output_dir', str(tmp_path / 'o')])
    assert proc.returncode != 0
    assert 'absent.yaml' in proc.stdout + proc.stderr


def test_a_forked_run_starts_with_the_interpreters_default_start_method(tmp_path):
    """Whatever start method this process set, a forked script's DataLoader workers start as in a fresh interpreter
    (the server's children inherit its forkserver method, which cannot pickle a dataset holding modules)."""
    import multiprocessing
    probe = tmp_path / 'probe.py'
    probe.write_text("import multiprocessing\nprint('start method', multiprocessing.get_start_method())\n")
    fresh = run_script(str(probe), timeout=60)
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method('forkserver', force=True)
    try:
        forked = run_forked(str(probe), timeout=60)
    finally:
        multiprocessing.set_start_method(before, force=True)
    assert fresh.returncode == 0 and forked.returncode == 0, fresh.stderr + forked.stderr
    assert forked.stdout == fresh.stdout and 'start method' in fresh.stdout
