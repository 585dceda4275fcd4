"""scripts/rerank_sweep.py: ITM re-ranking of the top k ITC candidates read off one scoring for every k. Its rows
must be what Retrieval.py's official protocol gives at that k (k = 16 against the margin runs' zero-shot evaluation
of the committed demo-length pretraining, tests/margin_runs.py), k = 1 must be ITC alone, and its restriction to the
top k must keep exactly each row's k best ITC candidates."""
import json
import os

import pytest
import torch

from scripts import rerank_sweep
from tests import margin_runs as settings
from tests.helpers import REPO, opts


def test_restrict_keeps_each_rows_itc_top_k():
    torch.manual_seed(0)
    sims, scores = torch.randn(5, 9), torch.randn(5, 9)
    kept = rerank_sweep.restrict(scores, sims, 3)
    top = sims.topk(3, dim=1).indices
    for row in range(5):
        inside = set(top[row].tolist())
        for col in range(9):
            expected = scores[row, col] if col in inside else rerank_sweep.NO_CANDIDATE
            assert kept[row, col] == expected
    assert torch.equal(rerank_sweep.restrict(scores, sims, 50), scores)  # k past the columns keeps everything


def test_wrong_pick_ranks_and_histogram():
    sims = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    scores = torch.tensor([[0.0, 0.0, 5.0], [0.0, 0.0, 5.0]])  # both pick column 2; only query 0 is wrong
    assert rerank_sweep.wrong_pick_ranks(scores, sims, {0: 0, 1: 2}) == [2]
    assert rerank_sweep.wrong_pick_ranks(scores, sims, {0: [0, 2], 1: [1]}) == [0]
    assert rerank_sweep.histogram([0, 2, 3, 40, 200]) == '1: 1, 3-4: 2, 33-64: 1, 65+: 1'


def test_attribute_report_counts_right_picks_and_the_pickers_ceiling():
    # four pictures: two red ones (one large, one small), a blue one and a green one; three texts
    attributes = {'colours': [('red',), ('red',), ('blue',), ('green',)],
                  'colours_sizes': [(('red', 'large'),), (('red', 'small'),), (('blue', 'large'),),
                                    (('green', 'large'),)]}
    txt2img = {0: 0, 1: 2, 2: 3}
    report = rerank_sweep.attribute_report([1, 2, 0], txt2img, attributes)
    # text 0 picked the other red picture (right colours, wrong size), text 1 its own, text 2 a red one (wrong)
    assert report['colours']['right'] == pytest.approx(200 / 3)
    assert report['colours_sizes']['right'] == pytest.approx(100 / 3)
    # knowing only the colours, text 0 draws between two pictures: (1/2 + 1 + 1) / 3; knowing the sizes too, no draw
    assert report['colours']['ceiling'] == pytest.approx(100 * 2.5 / 3)
    assert report['colours_sizes']['ceiling'] == pytest.approx(100.0)


def test_picture_attributes_refuses_a_split_of_another_world(tmp_path):
    (tmp_path / 'scenes.json').write_text(json.dumps({'test_000000': {'shapes': [
        {'colour': 'red', 'kind': 'star', 'size': 'small'}, {'colour': 'blue', 'kind': 'cross', 'size': 'large'}]}}))
    got = rerank_sweep.picture_attributes(['images/test_000000.jpg'], str(tmp_path))
    assert got == {'colours': [('blue', 'red')], 'colours_sizes': [(('blue', 'large'), ('red', 'small'))]}
    with pytest.raises(ValueError, match=r'scenes\.json does not describe 1 pictures .*test_000001'):
        rerank_sweep.picture_attributes(['images/test_000001.jpg'], str(tmp_path))
    with pytest.raises(FileNotFoundError, match='python -m synthetic.world'):
        rerank_sweep.picture_attributes(['images/test_000000.jpg'], str(tmp_path / 'nowhere'))


def test_sweep_reproduces_retrieval_py_and_itc_alone(margin_runs, tmp_path):
    data = settings._data(margin_runs.root, str(tmp_path))['retrieval']
    result = rerank_sweep.main(['--checkpoint', margin_runs.checkpoint, '--k', '1', '2', '16',
                                '--config', os.path.join(REPO, 'configs', 'Retrieval_synthetic.yaml'),
                                '--json', str(tmp_path / 'sweep.json'), '--world', margin_runs.root,
                                *opts(**data)])
    with open(os.path.join(margin_runs.runs['retrieval_zero_shot'], 'metrics.json')) as f:
        official = json.load(f)['test']  # Retrieval.py --evaluate, k_test 16
    assert result['itm'][16] == pytest.approx((official['txt_r1'], official['img_r1']), abs=1e-3)
    # k = 1: nothing to re-order, so ITC's ranking, whatever the score (the pretraining's own ITC check: 37.3 / 38.4)
    assert result['itm'][1] == result['itm_log_odds'][1]
    texts = result['texts']
    assert result['picks_at_k'] == 16 and texts == 576
    wrong = result['ir_wrong_pick_itc_positions']
    assert len(wrong) == round(texts * (1 - official['img_r1'] / 100)) and all(0 <= p < 16 for p in wrong)
    with open(tmp_path / 'sweep.json') as f:
        assert json.load(f)['itm']['16'] == pytest.approx(list(result['itm'][16]))
    # --world: a right first picture shows the right colours (and sizes), so those shares bound IR@1 from above
    for name, ir in (('itc', result['itm'][1][1]), ('itm_k16', official['img_r1'])):
        report = result['attributes'][name]
        assert report['colours']['right'] >= report['colours_sizes']['right'] >= ir - 1e-6, (name, report)
        # the picker's ceilings depend on the split only (measured: 50.5 knowing the colours, 74.8 with the sizes)
        assert report['colours']['ceiling'] < report['colours_sizes']['ceiling'] < 100
