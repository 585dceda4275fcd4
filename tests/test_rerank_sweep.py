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


def test_sweep_reproduces_retrieval_py_and_itc_alone(margin_runs, tmp_path):
    data = settings._data(margin_runs.root, str(tmp_path))['retrieval']
    result = rerank_sweep.main(['--checkpoint', margin_runs.checkpoint, '--k', '1', '2', '16',
                                '--config', os.path.join(REPO, 'configs', 'Retrieval_synthetic.yaml'),
                                '--json', str(tmp_path / 'sweep.json'), *opts(**data)])
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
