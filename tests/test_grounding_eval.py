"""RefCOCO+ reader on a small hand-made fixture in the official file formats, and the box-scoring metric of
evaluation/grounding.py (truncation, strict running maximum, fallback, inclusive IoU, orientation)."""
import json
import pickle

import pytest
import torch

from evaluation.grounding import (box_score, compute_gradcams, grounding_accuracy, inclusive_iou, predict_box,
                                  random_proposal_accuracy, select_box, upsample_map)
from evaluation.refer import RefCOCO, ReferError, load_detections
from dataset.collate import TextBatch
from tests.parity_utils import build_model, load_reference

# image 1 is 40 wide and 20 high (non-square, so a height/width swap shows); image 2 is 30 x 30
IMAGES = [{'id': 1, 'file_name': 'a.jpg', 'height': 20, 'width': 40}, {'id': 2, 'file_name': 'b.jpg', 'height': 30,
                                                                        'width': 30}]
ANNS = [{'id': 11, 'image_id': 1, 'bbox': [0, 0, 10, 10], 'category_id': 1},
        {'id': 12, 'image_id': 1, 'bbox': [28, 8, 10, 10], 'category_id': 2},
        {'id': 21, 'image_id': 2, 'bbox': [5, 5, 20, 20], 'category_id': 1},
        {'id': 22, 'image_id': 2, 'bbox': [0, 0, 4, 4], 'category_id': 3}]
REFS = [{'ref_id': 101, 'image_id': 1, 'ann_id': 11, 'split': 'val', 'sentences': [{'sent': 'left thing'}]},
        {'ref_id': 102, 'image_id': 1, 'ann_id': 12, 'split': 'testA', 'sentences': [{'sent': 'right thing'}]},
        {'ref_id': 201, 'image_id': 2, 'ann_id': 21, 'split': 'testB', 'sentences': [{'sent': 'big one'}]},
        {'ref_id': 202, 'image_id': 2, 'ann_id': 22, 'split': 'train', 'sentences': [{'sent': 'tiny one'}]}]
DETS = {'1': [[0.4, 0.6, 9.8, 9.9, 0.9, 1], [28.2, 7.7, 10.1, 10.3, 0.8, 2], [12, 2, 10, 10, 0.5, 3]],
        '2': [[5.3, 4.8, 19.6, 20.1, 0.9, 1], [0, 0, 4, 4, 0.7, 3], [20, 0, 9, 9, 0.4, 2]]}


@pytest.fixture
def refcoco(tmp_path):
    folder = tmp_path / 'refcoco+'
    folder.mkdir()
    (folder / 'refs(unc).p').write_bytes(pickle.dumps(REFS))
    (folder / 'instances.json').write_text(json.dumps({'images': IMAGES, 'annotations': ANNS, 'categories': []}))
    (folder / 'dets.json').write_text(json.dumps(DETS))
    return RefCOCO(str(tmp_path), 'refcoco+', 'unc'), load_detections(str(folder / 'dets.json'))


def test_reader_maps_refs_to_boxes_images_and_splits(refcoco):
    refer, dets = refcoco
    assert refer.split(101) == 'val' and refer.split(102) == 'testA' and refer.split(201) == 'testB'
    assert refer.box(102) == [28, 8, 10, 10]
    assert refer.image(102)['width'] == 40 and refer.image(102)['height'] == 20
    assert refer.image_id(201) == 2
    assert refer.ref_ids('train') == [202] and refer.ref_ids() == [101, 102, 201, 202]
    assert sorted(dets) == [1, 2] and dets[2][1] == [0.0, 0.0, 4.0, 4.0, 0.7, 3.0]
    with pytest.raises(ReferError, match='ref_id 999'):
        refer.split(999)


def test_reader_errors_name_the_missing_file(tmp_path):
    with pytest.raises(ReferError, match=r'refs\(unc\)\.p not found'):
        RefCOCO(str(tmp_path))
    with pytest.raises(ReferError, match='dets.json not found'):
        load_detections(str(tmp_path / 'dets.json'))


def test_inclusive_iou():
    assert inclusive_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert inclusive_iou([0, 0, 10, 10], [5, 0, 10, 10]) == pytest.approx(50 / 150)
    # one shared pixel column: ix1 == ix2, which the strict test counts as no overlap
    assert inclusive_iou([0, 0, 10, 10], [9, 0, 10, 10]) == 0.0
    assert inclusive_iou([0, 0, 10, 10], [5, 5, 10, 10]) == pytest.approx(25 / 175)
    assert inclusive_iou([0.5, 0, 10, 10], [5.5, 0, 10, 10]) == pytest.approx(50 / 150)
    assert inclusive_iou([0, 0, 10, 10], [20, 20, 5, 5]) == 0.0


def test_box_score_truncates_like_int_and_divides_by_sqrt_area():
    cam = torch.arange(100.0).view(10, 10)
    box = [0.5, 1.7, 2.6, 3.2]  # rows int(1.7)=1 .. int(4.9)=4, cols int(0.5)=0 .. int(3.1)=3
    assert box_score(cam, box) == pytest.approx(float(cam[1:4, 0:3].sum()) / (2.6 * 3.2) ** 0.5)
    assert box_score(cam, [1, 1, 0, 5]) != box_score(cam, [1, 1, 0, 5])  # zero area: NaN, never selected


def test_select_box_strict_running_max_and_fallback():
    assert select_box([0.1, 0.3, 0.3, 0.2]) == (1, False)  # first of ties
    assert select_box([0.0, -1.0, 2.0]) == (2, False)
    assert select_box([0.0, -1.0, -0.5]) == (0, True)  # nothing above 0: plain argmax, flagged
    assert select_box([-2.0, float('nan'), -0.5]) == (2, True)
    assert select_box([float('nan')]) == (0, True)


def test_upsampling_keeps_height_and_width_apart():
    cam = torch.zeros(4, 4)
    cam[0, 3] = 1.0  # top-right cell
    full = upsample_map(cam, 20, 40)
    assert full.shape == (20, 40)
    row, col = divmod(int(full.argmax()), 40)
    assert row < 5 and col >= 30
    box, fallback = predict_box(cam, {'height': 20, 'width': 40}, [[0, 0, 10, 10], [30, 0, 10, 5], [30, 15, 10, 5]])
    assert box == [30, 0, 10, 5] and not fallback


def test_grounding_accuracy_per_split_and_fallback_count(refcoco):
    refer, dets = refcoco
    left, right, blank = torch.zeros(4, 4), torch.zeros(4, 4), torch.zeros(4, 4)
    left[0:2, 0] = 1.0
    right[2:4, 3] = 1.0
    big = torch.zeros(4, 4)
    big[1:3, 1:3] = 1.0
    results = [{'ref_id': 101, 'pred': left}, {'ref_id': 102, 'pred': right}, {'ref_id': 102, 'pred': left},
               {'ref_id': 201, 'pred': big}, {'ref_id': 201, 'pred': blank}]
    metrics = grounding_accuracy(results, refer, dets)
    assert metrics['val_d'] == 1.0
    assert metrics['testA_d'] == 0.5  # same ref scored twice (two expressions), once right
    # the blank map has no positive score: argmax fallback picks the first proposal, which is the right box here
    assert metrics['testB_d'] == 1.0 and metrics['no_positive_score'] == 1
    assert (metrics['n_val'], metrics['n_testA'], metrics['n_testB']) == (1, 2, 2)


def test_random_proposal_accuracy(refcoco):
    refer, dets = refcoco
    chance = random_proposal_accuracy([101, 102, 201], refer, dets)
    assert chance == {'val_d': pytest.approx(1 / 3), 'testA_d': pytest.approx(1 / 3), 'testB_d': pytest.approx(1 / 3)}


def test_compute_gradcams_over_a_loader_gives_one_map_per_item():
    ref = load_reference('grounding')
    model = build_model('grounding', ref).train()
    inp = ref['inputs']
    loader = [(inp['image'][:2], TextBatch(inp['input_ids'][:2], inp['attention_mask'][:2]), inp['ref_ids'][:2]),
              (inp['image'][2:], TextBatch(inp['input_ids'][2:], inp['attention_mask'][2:]), inp['ref_ids'][2:])]
    for mode, block in (('itm', inp['block_num_itm']), ('itc', inp['block_num_itc'])):
        results = compute_gradcams(model, loader, 'cpu', mode, block)
        assert [r['ref_id'] for r in results] == inp['ref_ids'].tolist()
        cams = torch.stack([r['pred'] for r in results])
        expected = ref['outputs'][f'gradcam_{mode}']
        assert torch.allclose(cams / expected.abs().max(), expected / expected.abs().max(), atol=1e-5)
    assert model.training  # restored


# ---- Grounding.py on the hand-made REFER fixture ------------------------------------------------------------------
@pytest.mark.e2e
def test_grounding_script_trains_evaluates_and_writes_metrics(refcoco, tmp_path):
    import os

    import Grounding
    from PIL import Image
    from engine.config import load_config, save_config
    for record in IMAGES:
        Image.new('RGB', (record['width'], record['height']), (90, 160, 220)).save(tmp_path / record['file_name'])
    files = {1: 'a.jpg', 2: 'b.jpg'}
    items = [{'image': files[r['image_id']], 'text': r['sentences'][0]['sent'], 'ref_id': r['ref_id']} for r in REFS]
    (tmp_path / 'train.json').write_text(json.dumps([{k: i[k] for k in ('image', 'text')} for i in items] * 2))
    (tmp_path / 'test.json').write_text(json.dumps([i for i in items if i['ref_id'] != 202]))
    config = load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs', 'Grounding_synthetic.yaml'))
    config.update(train_file=[str(tmp_path / 'train.json')], test_file=[str(tmp_path / 'test.json')],
                  refcoco_data=str(tmp_path), det_file=str(tmp_path / 'refcoco+' / 'dets.json'),
                  coco_file=str(tmp_path / 'refcoco+' / 'dets.json'), image_root=str(tmp_path), image_res=32,
                  batch_size=2, num_workers=0, queue_size=4, gradcam_block=1, max_steps_per_epoch=2)
    config['vit'] = dict(config['vit'], depth=1)
    config['bert_config'] = dict(config['bert_config'], num_hidden_layers=2, fusion_layer=1)
    config['schedular'] = dict(config['schedular'], epochs=1)
    save_config(config, str(tmp_path / 'config.yaml'))
    common = ['--config', str(tmp_path / 'config.yaml'), '--device', 'cpu', '--text_encoder', 'none']
    out = tmp_path / 'ft'
    Grounding.main(Grounding.parser().parse_args(common + ['--output_dir', str(out)]))
    record = json.loads((out / 'log.txt').read_text().splitlines()[0])
    assert {'val_d', 'testA_d', 'testB_d', 'no_positive_score', 'train_loss_ita', 'train_loss_itm'} <= set(record)
    assert (out / 'checkpoint_best.pth').is_file()
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['gradcam_mode'] == 'itm' and metrics['gradcam_block'] == 1
    assert metrics['random_proposal']['val_d'] == pytest.approx(1 / 3)
    ev = tmp_path / 'ev'
    Grounding.main(Grounding.parser().parse_args(common + ['--output_dir', str(ev), '--evaluate', '--checkpoint',
                                                           str(out / 'checkpoint_best.pth'), '--gradcam_mode', 'itc',
                                                           '--block_num', '0']))
    metrics = json.loads((ev / 'metrics.json').read_text())
    assert metrics['evaluate_only'] and metrics['gradcam_mode'] == 'itc' and metrics['gradcam_block'] == 0
    assert metrics['accuracy']['n_val'] == 1 and metrics['accuracy']['n_testA'] == 1
    assert 'gradcam_mode: itc' in (ev / 'config.yaml').read_text()
