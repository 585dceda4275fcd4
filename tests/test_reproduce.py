"""python -m reproduce: the cells file, `check` on good and broken data, the commands `run` builds, `report` units and
verdicts, the generated docs and the hand-written TensorBoard event files (the end-to-end run of a synthetic cell is in
tests/test_plot_run.py, with the other tests that run entry scripts)."""
import json
import os
import shutil
import struct

import pytest
import torch

from reproduce import events
from reproduce.__main__ import main as cli
from reproduce.cells import REPO_ROOT, TASK_LAYOUT, build_commands, data_opts, load_config, load_table
from reproduce.check import check_cell, checkpoint_layout
from reproduce.report import collect, markdown

pytestmark = pytest.mark.unit

from synthetic.world import generate

# the flat metric names every entry script writes into metrics.json['metrics']
CONTRACT_KEYS = {
    'retrieval': {f'{s}_{d}_r{k}' for s in ('val', 'test') for d in ('txt', 'img') for k in (1, 5, 10)},
    'nlvr': {'val_acc', 'test_acc'}, 've': {'val_acc', 'test_acc'}, 'grounding': {'val_d', 'testA_d', 'testB_d'},
    'vqa': {'test_vqa_acc'}, 'pretrain': {f'zeroshot_{d}_r{k}' for d in ('txt', 'img') for k in (1, 5, 10)},
}


@pytest.fixture(scope='module')
def table():
    return load_table()


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp('reproduce_world')
    generate(root, seed=0, scale=0.05)
    return root


@pytest.fixture
def world_copy(world, tmp_path):
    """A copy of the tiny world the test may break."""
    dst = tmp_path / 'world'
    shutil.copytree(world, dst)
    return dst


def run_check(table, cell_id, data_root, **kw):
    kw.setdefault('progress', False)
    return check_cell(table, table.cell(cell_id), str(data_root), **kw)


def problems_text(result):
    return '\n'.join(str(f) for f in result.problems)


# ---- the cells file ---------------------------------------------------------------------------------------------
def test_cells_cover_the_paper_tables(table):
    ids = {c.id for c in table.cells}
    for pretraining in ('4M', '14M'):
        for cell in ('retrieval.flickr.ft', 'retrieval.coco.ft', 'retrieval.flickr.zs', 'vqa', 'nlvr2', 'snli_ve'):
            assert f'{cell}.{pretraining}' in ids
    assert {'grounding.refcoco+.itm.14M', 'grounding.refcoco+.itc.14M'} <= ids
    assert {f'synthetic.{t}' for t in ('pretrain', 'retrieval', 'vqa', 'nlvr', 've', 'grounding')} <= ids
    _, tr1 = table.metric('retrieval.flickr.ft.4M.tr_r1')
    assert tr1.paper == 94.3 and tr1.key == 'test_txt_r1' and tr1.unit == 'percent'
    _, ir10 = table.metric('retrieval.coco.ft.14M.ir_r10')
    assert ir10.paper == 90.5 and ir10.key == 'test_img_r10'
    _, dev = table.metric('nlvr2.14M.dev')
    assert dev.paper == 82.55 and dev.unit == 'fraction'
    assert all(m.server for m in table.cell('vqa.14M').metrics)
    for cell in table.cells:
        assert cell.family == 'albef'
        for metric in cell.metrics:
            if not cell.id.startswith('synthetic.'):
                assert metric.paper is not None, metric
                for mode in cell.commands:
                    assert 0 < cell.tolerance_of(metric, mode) <= 2.0
            if not metric.server:
                assert metric.key in CONTRACT_KEYS[cell.task], (cell.id, metric.key)


def test_every_step_points_at_real_scripts_configs_and_keys(table):
    for cell in table.cells:
        for mode, steps in cell.commands.items():
            for step in steps:
                assert os.path.isfile(os.path.join(REPO_ROOT, step.script)), step.script
                config = load_config(step.config)
                dataset = table.datasets[step.data]
                keys = {e['key'] for e in dataset['files'] if e.get('key')} | set(dataset.get('roots') or {})
                # every file and root of the dataset reaches the script: the config has the key
                assert keys <= set(config), (cell.id, step.config, keys - set(config))
                opts = data_opts(table, step.data, step.config, '/data')
                assert len(opts) == len(keys)
            if mode == 'evaluate':
                assert '--evaluate' in steps[-1].args, cell.id
        if cell.pretrained:
            assert table.checkpoints[cell.pretrained]['layout'] == 'pretrain'
        if cell.finetuned:
            assert table.checkpoints[cell.finetuned]['layout'] == TASK_LAYOUT[cell.task]


def test_run_prints_the_command_and_uses_torchrun(table, tmp_path, capsys):
    out = tmp_path / 'out'
    assert cli(['run', 'retrieval.coco.ft.14M', '--data_root', '/data', '--output_dir', str(out), '--dry_run',
                '--torchrun', '8']) == 0
    line = capsys.readouterr().out.strip()
    assert '-m torch.distributed.run --nproc_per_node=8 Retrieval.py --config configs/Retrieval_coco.yaml' in line
    assert '--checkpoint /data/checkpoints/ALBEF.pth' in line
    assert "'train_file=[/data/coco_train.json]'" in line and 'test_file=/data/coco_test.json' in line
    assert 'image_root=/data/images/coco' in line and '--evaluate' not in line
    assert not out.exists()


def test_two_step_cells_chain_their_outputs(table):
    cmds = build_commands(table, table.cell('nlvr2.4M'), 'train', '/d', '/o')
    (ta, ta_out), (nlvr, nlvr_out) = cmds
    assert ta[1] == 'Pretrain_nlvr.py' and ta_out == '/o/ta_pretrain'
    assert nlvr_out == '/o' and nlvr[nlvr.index('--checkpoint') + 1] == '/o/ta_pretrain/checkpoint_last.pth'
    zs = build_commands(table, table.cell('retrieval.flickr.zs.14M'), 'evaluate', '/d', '/o')
    assert len(zs) == 1 and '/d/checkpoints/mscoco.pth' in zs[0][0] and 'configs/Retrieval_flickr.yaml' in zs[0][0]


def test_evaluating_a_cell_without_released_checkpoint_asks_for_one(tmp_path, capsys):
    code = cli(['run', 'snli_ve.4M', '--data_root', str(tmp_path), '--output_dir', str(tmp_path / 'o'), '--evaluate',
                '--dry_run'])
    assert code == 2 and '--checkpoint' in capsys.readouterr().err
    assert cli(['run', 'snli_ve.4M', '--data_root', str(tmp_path), '--output_dir', str(tmp_path / 'o'),
                '--evaluate', '--dry_run', '--checkpoint', str(tmp_path / 've.pth')]) == 0


# ---- check ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('cell_id', ['synthetic.retrieval', 'synthetic.vqa', 'synthetic.nlvr', 'synthetic.ve',
                                     'synthetic.grounding', 'synthetic.pretrain'])
def test_check_passes_on_the_synthetic_world(table, world, cell_id):
    result = run_check(table, cell_id, world)
    assert result.ok, problems_text(result)
    assert result.images_checked == result.images_total > 0


def test_check_cli_exit_status_and_sample(world, capsys):
    assert cli(['check', 'synthetic.retrieval', '--data_root', str(world), '--images', '5', '--no_progress']) == 0
    out = capsys.readouterr().out
    assert 'random sample of 5' in out and out.strip().splitlines()[-1].startswith('OK: synthetic.retrieval')


def test_check_names_a_missing_image(table, world_copy, capsys):
    item = json.loads((world_copy / 'retrieval_test.json').read_text())[2]
    os.remove(world_copy / item['image'])
    result = run_check(table, 'synthetic.retrieval', world_copy, mode='evaluate')
    assert not result.ok
    text = problems_text(result)
    assert str(world_copy / item['image']) in text and 'image missing' in text and 'retrieval_test.json' in text
    assert cli(['check', 'synthetic.retrieval', '--data_root', str(world_copy), '--no_progress']) == 1
    assert 'fix:' in capsys.readouterr().out


def test_check_names_a_truncated_annotation_file(table, world_copy):
    path = world_copy / 'retrieval_val.json'
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    result = run_check(table, 'synthetic.retrieval', world_copy, images=0)
    assert len(result.problems) == 1
    assert str(path) in problems_text(result) and 'not valid JSON' in problems_text(result)


def test_check_names_an_item_of_the_wrong_format(table, world_copy):
    path = world_copy / 'nlvr_dev.json'
    items = json.loads(path.read_text())
    items[3]['label'] = 'yes'
    path.write_text(json.dumps(items))
    text = problems_text(run_check(table, 'synthetic.nlvr', world_copy, images=0))
    assert str(path) in text and 'item 3' in text and "'yes'" in text


def test_check_names_a_wrong_split_size(table, world_copy, tmp_path):
    path = world_copy / 'retrieval_test.json'
    items = json.loads(path.read_text())
    path.write_text(json.dumps(items[:-1]))
    text = problems_text(run_check(table, 'synthetic.retrieval', world_copy, images=0))
    assert str(path) in text and f'items = {len(items) - 1}, expected {len(items)}' in text
    # a real cell: the Flickr30K 1K test split (1,000 images, 5,000 captions) with one image too few
    flickr = tmp_path / 'flickr'
    (flickr / 'images' / 'flickr30k').mkdir(parents=True)
    test = [{'image': f'flickr30k-images/{i}.jpg', 'caption': ['a'] * 5} for i in range(999)]
    (flickr / 'flickr30k_test.json').write_text(json.dumps(test))
    result = run_check(table, 'retrieval.flickr.ft.14M', flickr, images=0)
    text = problems_text(result)
    assert 'flickr30k_test.json: images = 999, expected 1000' in text
    assert 'captions = 4995, expected 5000' in text
    assert 'flickr30k_train.json: file not found' in text  # the other files are named too


def tiny_state_dict(kind):
    """A few keys with the names the layout detectors of models/checkpoint.py look at."""
    t = torch.zeros(2, 2)
    sd = {'visual_encoder.cls_token': t, 'vision_proj.weight': t}
    if kind == 'pretrain':
        sd.update({'text_encoder.bert.embeddings.word_embeddings.weight': t, 'itm_head.weight': t,
                   'visual_encoder_m.cls_token': t, 'image_queue': t})
    elif kind == 'retrieval':
        sd.update({'text_encoder.embeddings.word_embeddings.weight': t, 'itm_head.weight': t})
    elif kind == 'vqa':
        sd.update({'text_encoder.embeddings.word_embeddings.weight': t,
                   'text_decoder.bert.embeddings.word_embeddings.weight': t})
    elif kind == 'ta':
        sd.update({'text_encoder.embeddings.word_embeddings.weight': t, 'ta_head.weight': torch.zeros(3, 2)})
    elif kind in ('nlvr', 've'):
        sd.update({'text_encoder.embeddings.word_embeddings.weight': t,
                   'cls_head.2.weight': torch.zeros(2 if kind == 'nlvr' else 3, 2)})
    return sd


@pytest.mark.parametrize('kind', ['pretrain', 'retrieval', 'vqa', 'ta', 'nlvr', 've'])
def test_checkpoint_layouts_are_told_apart(kind):
    assert checkpoint_layout(tiny_state_dict(kind)) == kind


def test_check_rejects_a_checkpoint_of_the_wrong_task(table, world, tmp_path):
    vqa = tmp_path / 'vqa.pth'
    torch.save({'model': tiny_state_dict('vqa')}, vqa)
    pre = tmp_path / 'pre.pth'
    torch.save(tiny_state_dict('pretrain'), pre)  # raw state dicts are accepted too
    bad = run_check(table, 'synthetic.retrieval', world, images=0, checkpoint=str(vqa))
    text = problems_text(bad)
    assert str(vqa) in text and 'is a VQA model' in text and 'expects a pretraining checkpoint' in text
    assert run_check(table, 'synthetic.retrieval', world, images=0, checkpoint=str(pre)).ok
    # evaluation expects a fine-tuned retrieval file, not a pretraining one
    text = problems_text(run_check(table, 'synthetic.retrieval', world, mode='evaluate', images=0,
                                   checkpoint=str(pre)))
    assert 'is a pretraining checkpoint' in text and 'expects a retrieval/grounding model' in text


def test_check_rejects_a_truncated_checkpoint_and_a_wrong_released_file(table, world, tmp_path):
    good = tmp_path / 'good.pth'
    torch.save({'model': tiny_state_dict('pretrain')}, good)
    cut = tmp_path / 'cut.pth'
    cut.write_bytes(good.read_bytes()[:200])
    text = problems_text(run_check(table, 'synthetic.retrieval', world, images=0, checkpoint=str(cut)))
    assert str(cut) in text and 'cannot be read' in text
    # a file named like the release but without its 844 keys
    fake = tmp_path / 'ALBEF.pth'
    shutil.copy(good, fake)
    result = run_check(table, 'retrieval.flickr.ft.14M', tmp_path, images=0, checkpoint=str(fake))
    assert f'{fake}: has 6 state-dict keys; the released ALBEF.pth has 844' in problems_text(result)
    # the default place of released files is DATA_ROOT/checkpoints/
    result = run_check(table, 'retrieval.coco.ft.14M', tmp_path, mode='evaluate', images=0)
    assert f'{tmp_path}/checkpoints/mscoco.pth: checkpoint not found' in problems_text(result)


# ---- report -----------------------------------------------------------------------------------------------------
def write_run(folder, metrics, cell=None, mode=None, **fields):
    folder.mkdir(parents=True)
    doc = {'task': 'x', 'model': 'albef', 'config': '', 'checkpoint': '', 'evaluate_only': mode == 'evaluate',
           'epoch': 0, 'metrics': metrics, **fields}
    (folder / 'metrics.json').write_text(json.dumps(doc))
    if cell:
        (folder / 'reproduce.json').write_text(json.dumps({'cell': cell, 'mode': mode}))
    return str(folder)


def test_report_converts_units_and_judges_each_number(table, tmp_path):
    flickr = write_run(tmp_path / 'flickr', {'test_txt_r1': 95.6, 'test_txt_r5': 99.8, 'test_txt_r10': 100.0,
                                             'test_img_r1': 84.9, 'test_img_r5': 97.5, 'test_img_r10': 98.9},
                       'retrieval.flickr.ft.14M', 'evaluate')
    nlvr = write_run(tmp_path / 'nlvr', {'val_acc': 0.8031, 'test_acc': 0.7950})  # no reproduce.json: CELL=DIR
    vqa = write_run(tmp_path / 'vqa', {}, 'vqa.4M', 'train', result_file='result/vqa_result_epoch7.json')
    coco = write_run(tmp_path / 'coco', {'test_txt_r1': 77.5}, evaluate_only=True)
    doc = json.loads((tmp_path / 'coco' / 'metrics.json').read_text())
    doc.update(config='configs/Retrieval_coco.yaml', checkpoint='/ckpt/mscoco.pth')
    (tmp_path / 'coco' / 'metrics.json').write_text(json.dumps(doc))
    rows = {r.metric_id: r for r in collect(table, [flickr, f'nlvr2.4M={nlvr}', vqa, coco,
                                                    str(tmp_path / 'nothing')])}
    assert rows['retrieval.flickr.ft.14M.tr_r1'].verdict == 'within'  # -0.3, evaluate tolerance 0.5
    assert rows['retrieval.flickr.ft.14M.ir_r1'].verdict == 'OUTSIDE'  # -0.7
    assert rows['retrieval.flickr.ft.14M.ir_r1'].difference == pytest.approx(-0.7)
    dev, test = rows['nlvr2.4M.dev'], rows['nlvr2.4M.test_p']
    assert dev.ours == pytest.approx(80.31) and dev.mode == 'train' and dev.tolerance == 1.5
    assert dev.verdict == 'within' and test.verdict == 'within'  # -0.55 and -0.96 within the fine-tuning 1.5
    assert rows['vqa.4M.test_dev'].verdict == 'server' and 'vqa_result_epoch7.json' in rows['vqa.4M.test_dev'].note
    # found from the config and checkpoint recorded in metrics.json
    assert rows['retrieval.coco.ft.14M.tr_r1'].verdict == 'within'
    assert rows['retrieval.coco.ft.14M.tr_r5'].verdict == 'missing'
    assert rows['?'].verdict == 'missing'
    # a failed run is not read, even when an older metrics.json is still there
    (tmp_path / 'flickr' / 'reproduce.json').write_text(json.dumps({'cell': 'retrieval.flickr.ft.14M',
                                                                    'mode': 'evaluate', 'returncodes': [1]}))
    assert [r.verdict for r in collect(table, [flickr])] == ['failed']
    md = markdown(list(rows.values()))
    assert '| retrieval.flickr.ft.14M.ir_r1 | 84.90 | 85.60 | -0.70 | ±0.5 | OUTSIDE |' in md
    assert '| nlvr2.4M.dev | 80.31 | 80.24 | +0.07 | ±1.5 | within |' in md


def test_report_notes_a_fine_tuning_run_on_fewer_gpus_than_the_paper(table, tmp_path):
    run = write_run(tmp_path / 've', {'val_acc': 0.801, 'test_acc': 0.803}, 'snli_ve.4M', 'train')
    record = json.loads((tmp_path / 've' / 'reproduce.json').read_text())
    (tmp_path / 've' / 'reproduce.json').write_text(json.dumps(dict(record, nproc=1)))
    rows = collect(table, [run])
    assert all(r.verdict == 'within' and 'trained on 1 process(es); the paper used 8 GPUs' in r.note for r in rows)
    (tmp_path / 've' / 'reproduce.json').write_text(json.dumps(dict(record, nproc=8)))
    assert not any(r.note for r in collect(table, [run]))


def test_report_cli_writes_markdown(tmp_path, capsys):
    run = write_run(tmp_path / 've', {'val_acc': 0.5, 'test_acc': 0.25}, 'synthetic.ve', 'train')
    md = tmp_path / 'report.md'
    assert cli(['report', run, '--markdown', str(md)]) == 0
    text = md.read_text()
    assert '| synthetic.ve.test | 25.00 | — | — | — | no paper number |' in text
    assert text in capsys.readouterr().out


# ---- docs -------------------------------------------------------------------------------------------------------
def test_docs_are_up_to_date(table):
    from reproduce.docs import DOC_PATH, render
    with open(DOC_PATH, encoding='utf-8') as f:
        assert f.read() == render(table), 'docs/REPRODUCE.md is stale: run python -m reproduce docs'


# ---- event files ------------------------------------------------------------------------------------------------
def test_crc32c_check_value():
    assert events.crc32c(b'123456789') == 0xE3069283  # the standard CRC-32C check value


def test_event_writer_round_trip(tmp_path):
    log_dir = tmp_path / 'tb'
    with events.EventWriter(str(log_dir)) as writer:
        writer.add_scalars(-1, {'epoch/zeroshot_txt_r1': 12.5})
        for step in range(1, 4):
            writer.add_scalars(step, {'train/loss_ita': 5.0 - step, 'train/lr': 1e-4 * step, 'note': 'skipped'})
        writer.add_scalar('train/big_step', 2.5, 2 ** 40)
        writer.flush()
    files = list(log_dir.iterdir())
    assert len(files) == 1 and 'tfevents' in files[0].name
    evs = events.read_events(str(files[0]))
    assert evs[0]['file_version'] == 'brain.Event:2' and not evs[0]['scalars']
    scalars = events.read_scalars(str(log_dir))
    assert scalars['epoch/zeroshot_txt_r1'] == [(-1, 12.5)]
    assert [s for s, _ in scalars['train/loss_ita']] == [1, 2, 3]
    assert [v for _, v in scalars['train/loss_ita']] == [4.0, 3.0, 2.0]
    assert [v for _, v in scalars['train/lr']] == pytest.approx([1e-4, 2e-4, 3e-4], rel=1e-6)  # float32
    assert scalars['train/big_step'] == [(2 ** 40, 2.5)] and 'note' not in scalars
    # the framing: length, masked CRC of the length, data, masked CRC of the data
    blob = files[0].read_bytes()
    (length,) = struct.unpack('<Q', blob[:8])
    assert struct.unpack('<I', blob[8:12])[0] == events.masked_crc32c(blob[:8])
    assert struct.unpack('<I', blob[12 + length:16 + length])[0] == events.masked_crc32c(blob[12:12 + length])
    files[0].write_bytes(blob[:-3])
    with pytest.raises(events.EventFileError, match='truncated'):
        events.read_scalars(str(log_dir))


def test_tensorboard_reads_our_event_file(tmp_path):
    pytest.importorskip('tensorboard', reason='optional: tensorboard is not a dependency')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    writer = events.EventWriter(str(tmp_path))
    for step in range(5):
        writer.add_scalars(step, {'train/loss': 1.0 / (step + 1), 'train/lr': 0.5})
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert set(acc.Tags()['scalars']) == {'train/loss', 'train/lr'}
    loss = acc.Scalars('train/loss')
    assert [e.step for e in loss] == list(range(5))
    assert [e.value for e in loss] == pytest.approx([1.0 / (s + 1) for s in range(5)], rel=1e-6)
