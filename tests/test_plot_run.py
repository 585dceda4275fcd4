"""Pictures of a REAL tiny run (`python -m reproduce plot`) and one synthetic cell run end to end with
`python -m reproduce run` then `report`. Both run entry scripts in processes of their own (tests/helpers.py:
run_forked), so this file is e2e."""
import json
import os
import shutil

import pytest

from reproduce.__main__ import main as cli
from reproduce.cells import REPO_ROOT, load_table
from reproduce.plot import plot_runs, read_jsonl
from reproduce.report import collect
from tests.helpers import run_forked

pytestmark = pytest.mark.e2e

from synthetic.world import generate

STEPS, EPOCHS = 3, 2
ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp('plot_world')
    generate(root, seed=0, scale=0.05)
    return root


@pytest.fixture(scope='module')
def tiny_run(world, tmp_path_factory):
    """A few steps of Pretrain.py on the tiny world, logging every step, with the zero-shot check each epoch."""
    out = tmp_path_factory.mktemp('plot_run') / 'pretrain_tiny'
    opts = {'train_file': f'[{world}/pretrain.json]', 'image_root': str(world),
            'val_file': f'{world}/retrieval_test.json', 'init_deit': 'false', 'num_workers': 0, 'batch_size': 4,
            'queue_size': 32, 'max_steps_per_epoch': STEPS, 'schedular.epochs': EPOCHS, 'log_every': 1}
    argv = ['--config', 'configs/Pretrain_synthetic.yaml', '--output_dir', str(out),
            '--text_encoder', 'none', '--device', 'cpu', '--seed', '0']
    for key, value in opts.items():
        argv += ['--opt', f'{key}={value}']
    proc = run_forked('Pretrain.py', argv, env=ENV, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_the_run_logs_what_the_plot_reads(tiny_run):
    steps = read_jsonl(tiny_run / 'train_steps.jsonl')
    assert len(steps) == STEPS * EPOCHS
    assert {'epoch', 'step', 'lr', 'samples_per_s', 'loss_ita', 'loss_itm', 'loss_mlm'} <= set(steps[0])
    epochs = read_jsonl(tiny_run / 'log.txt')
    assert [r['epoch'] for r in epochs] == [-1] + list(range(EPOCHS))  # -1: zero-shot before training


def test_plot_draws_every_logged_point(tiny_run, tmp_path):
    from PIL import Image
    out = tmp_path / 'run.png'
    fig, drawn = plot_runs([str(tiny_run)], str(out), columns=3, panel_size=(3.6, 2.5), dpi=80)
    label = 'pretrain_tiny'
    n_steps = len(read_jsonl(tiny_run / 'train_steps.jsonl'))
    for key in ('loss_ita', 'loss_itm', 'loss_mlm', 'lr', 'samples_per_s'):
        assert drawn[f'{label}/{key}'] == n_steps, key
    assert f'{label}/peak_mem_gb' not in drawn  # CPU runs log no memory
    n_epochs = len(read_jsonl(tiny_run / 'log.txt'))
    for key in ('zeroshot_txt_r1', 'zeroshot_img_r1', 'zeroshot_r_mean'):
        assert drawn[f'{label}/{key}'] == n_epochs, key
    # 5 step panels + 3 epoch panels = 8 panels on a 3 x 3 grid of 3.6 x 2.5 inch panels at 80 dpi
    assert len(fig.axes) == 9
    with Image.open(out) as img:
        assert img.format == 'PNG' and img.size == (round(3 * 3.6 * 80), round(3 * 2.5 * 80))
    # the x axis: epoch + (step + 1) / steps per epoch
    xs = fig.axes[0].lines[0].get_xdata()
    assert list(xs) == pytest.approx([e + (s + 1) / STEPS for e in range(EPOCHS) for s in range(STEPS)])


def test_plot_several_runs_side_by_side(tiny_run, tmp_path, capsys):
    shorter = tmp_path / 'shorter'
    shutil.copytree(tiny_run, shorter, ignore=shutil.ignore_patterns('*.pth'))
    lines = (shorter / 'train_steps.jsonl').read_text().splitlines(keepends=True)
    (shorter / 'train_steps.jsonl').write_text(''.join(lines[:STEPS + 1]))  # stopped one step into epoch 1
    out = tmp_path / 'two.png'
    assert cli(['plot', str(tiny_run), str(shorter), '--out', str(out), '--labels', 'full', 'cut']) == 0
    assert 'curves' in capsys.readouterr().out and out.stat().st_size > 0
    fig, drawn = plot_runs([str(tiny_run), str(shorter)], None, labels=['full', 'cut'])
    assert drawn['full/loss_ita'] == STEPS * EPOCHS and drawn['cut/loss_ita'] == STEPS + 1
    ax = fig.axes[0]
    assert len(ax.lines) == 2 and ax.lines[0].get_color() != ax.lines[1].get_color()
    assert {t.get_text() for t in fig.legends[0].get_texts()} == {'full', 'cut'}


def test_run_then_report_a_synthetic_cell(world, tmp_path):
    out = tmp_path / 'run_ve'
    proc = run_forked('reproduce', ['run', 'synthetic.ve', '--data_root', str(world), '--output_dir', str(out), '--',
                                    '--device', 'cpu', '--seed', '0'], env=ENV, timeout=1200)
    first = proc.stdout.splitlines()[0] if proc.stdout else ''
    assert 'VE.py --config configs/VE_synthetic.yaml' in first and '--device cpu' in first
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / 'reproduce.json').read_text())
    assert record['cell'] == 'synthetic.ve' and record['mode'] == 'train' and record['returncodes'] == [0]
    doc = json.loads((out / 'metrics.json').read_text())
    if 'metrics' not in doc:
        pytest.skip('VE.py does not write the flat "metrics" field of metrics.json yet')
    rows = collect(load_table(), [str(out)])
    assert [r.metric_id for r in rows] == ['synthetic.ve.val', 'synthetic.ve.test']
    for row in rows:
        assert row.verdict == 'no paper number' and 0.0 <= row.ours <= 100.0
    assert rows[0].ours == pytest.approx(100 * doc['metrics']['val_acc'])
    assert rows[1].ours == pytest.approx(100 * doc['metrics']['test_acc'])
