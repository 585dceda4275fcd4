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


def test_background_scripts_start_after_the_scripts_they_need_and_their_log_keeps_the_command_order(tmp_path):
    """BackgroundRun: a script starts only when the scripts it needs have ended well; after a failure the scripts
    still waiting are skipped and wait() names the failed one; the log holds the outputs in the order of the
    commands, whatever order they ran in."""
    from tests.helpers import BackgroundRun, _Pool
    pool = _Pool(2)  # not the session's, which the background runs of the suite may keep busy
    stamp = tmp_path / 'order.txt'
    step = tmp_path / 'step.py'
    step.write_text('import sys, time\n'
                    'time.sleep(float(sys.argv[2]))\n'
                    f'open({str(stamp)!r}, "a").write(sys.argv[1] + "\\n")\n'
                    'print("output of", sys.argv[1])\n'
                    'sys.exit(int(sys.argv[3]))\n')
    # 0 slow; 1 and 2 need 0; 3 needs nothing (runs beside 0)
    run = BackgroundRun([(str(step), ['a', 0.6, 0]), (str(step), ['b', 0, 0], [0]), (str(step), ['c', 0, 0], [0]),
                         (str(step), ['d', 0, 0], [])], tmp_path / 'runs.log', pool=pool)
    run.wait(timeout=120)
    order = stamp.read_text().split()
    assert order[0] == 'd' and order[1] == 'a' and sorted(order[2:]) == ['b', 'c'], order
    log = (tmp_path / 'runs.log').read_text()
    assert [line.split()[-1] for line in log.splitlines() if line.startswith('output of')] == ['a', 'b', 'c', 'd']
    assert log.count('exited with 0') == 4 and log.count('$ ') == 4

    stamp.unlink()
    failing = BackgroundRun([(str(step), ['e', 0, 3]), (str(step), ['f', 0, 0])], tmp_path / 'failing.log',
                            pool=pool)
    with pytest.raises(AssertionError, match=r'step\.py exited with 3'):
        failing.wait(timeout=120)
    assert stamp.read_text().split() == ['e']  # f needed e: skipped
