"""VQA accuracy on hand-checked cases, answer normalisation, and the result file (format, exactly-once, merging
across ranks)."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist

import engine
from evaluation.vqa_eval import (check_results, dedup_results, ground_truth_answers, most_common_answer_accuracy,
                                 normalize_answer, predict_answers, score_results, vqa_accuracy)
from tests.helpers import spawn


@pytest.mark.parametrize('raw, expected', [
    ('Yes', 'yes'), ('yes!', 'yes'), ('The dog.', 'dog'), ('a red car', 'red car'), ('an apple', 'apple'),
    ('two', '2'), ('none', '0'), ('Ten', '10'), ('3.5', '3.5'), ('1,000', '1000'), ('left/right', 'left right'),
    ('t-shirt', 't shirt'), ('dont', "don't"), ('couldnt\'ve', "couldn't've"),
    ('isnt it', "isn't it"), ('its', 'its'), ('  red \n', 'red'), ('(kite)', 'kite'), ('yes ,no', 'yes no'),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize('prediction, humans, expected', [
    ('yes', ['yes'] * 10, 1.0),
    ('no', ['yes'] * 10, 0.0),
    ('red', ['red'] * 3 + ['blue'] * 7, 0.9),        # (3 * 2/3 + 7 * 1) / 10
    ('2', ['two'] * 2 + ['three'] * 8, 0.6),          # (2 * 1/3 + 8 * 2/3) / 10; 'two' normalises to '2'
    ('cat', ['cat'] + ['dog'] * 9, 0.3),               # (1 * 0 + 9 * 1/3) / 10
    ('cat', ['cat'] * 4 + ['dog'] * 6, 1.0),           # every 9-subset has >= 3 matches
    ('The Cat.', ['cat'] * 3 + ['dog'] * 7, 0.9),      # normalised before matching
])
def test_vqa_accuracy_hand_checked(prediction, humans, expected):
    assert vqa_accuracy(prediction, humans) == pytest.approx(expected)


def test_score_results_and_majority_baseline():
    gt = {1: ['yes'] * 10, 2: ['no'] * 10, 3: ['2'] * 10}
    results = [{'question_id': 1, 'answer': 'yes'}, {'question_id': 2, 'answer': 'yes'},
               {'question_id': 3, 'answer': 'two'}, {'question_id': 9, 'answer': 'x'}]
    assert score_results(results, gt) == {'vqa_acc': pytest.approx(200 / 3), 'vqa_scored': 3}
    assert most_common_answer_accuracy(gt, ['yes', 'yes', 'no']) == ('yes', pytest.approx(100 / 3))
    anns = [{'question_id': 1, 'answer': ['a'] * 10}, {'question_id': 2}, {'answer': 'vg', 'question': 'q'}]
    assert ground_truth_answers(anns) == {1: ['a'] * 10}


def test_check_and_dedup_results():
    results = [{'question_id': 3, 'answer': 'a'}, {'question_id': 1, 'answer': 'b'}, {'question_id': 3, 'answer': 'c'}]
    with pytest.raises(ValueError, match='1 duplicate'):
        check_results(results, [1, 3])
    merged = dedup_results(results)
    assert merged == [{'question_id': 1, 'answer': 'b'}, {'question_id': 3, 'answer': 'a'}]
    check_results(merged, [1, 3])
    with pytest.raises(ValueError, match='1 missing'):
        check_results(merged, [1, 2, 3])


class FakeRanker(torch.nn.Module):
    """Answers question b with list entry (first question token) % 3 at the highest probability."""

    def forward(self, image, question, answers, train=False, k=None):
        assert not train and answers.input_ids.shape[0] == 3
        best = question.input_ids[:, 1] % 3
        ids = torch.stack([(best + 1) % 3, best, (best + 2) % 3], dim=1)
        return ids, torch.tensor([[0.3, 0.6, 0.1]]).expand(len(best), 3)


class ListTokenizer:
    def __call__(self, texts, padding='longest', return_tensors='pt'):
        ids = torch.tensor([[101, 5 + i] for i, _ in enumerate(texts)])
        from types import SimpleNamespace
        batch = SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))
        batch.to = lambda device: batch
        return batch


def test_predict_answers_takes_highest_probability():
    from types import SimpleNamespace
    q = SimpleNamespace(input_ids=torch.tensor([[101, 4], [101, 5]]), attention_mask=torch.ones(2, 2))
    q.to = lambda device: q
    loader = [(torch.zeros(2, 3, 8, 8), q, torch.tensor([10, 11]))]
    out = predict_answers(FakeRanker(), loader, ['yes', 'no', 'two'], ListTokenizer(), 'cpu', k=3,
                          show_progress=False)
    assert out == [{'question_id': 10, 'answer': 'no'}, {'question_id': 11, 'answer': 'two'}]
    assert all(type(r['question_id']) is int and type(r['answer']) is str for r in out)


def test_save_result_single_process(tmp_path):
    path, merged = engine.save_result([{'question_id': 2, 'answer': 'a'}, {'question_id': 1, 'answer': 'b'},
                                       {'question_id': 2, 'answer': 'a'}], str(tmp_path), 'vqa_result_epoch0',
                                      merge=dedup_results)
    assert path == str(tmp_path / 'vqa_result_epoch0.json')
    assert json.load(open(path)) == merged == [{'question_id': 1, 'answer': 'b'}, {'question_id': 2, 'answer': 'a'}]
    assert os.path.isfile(tmp_path / 'vqa_result_epoch0_rank0.json')


def _rank_worker(rank, world, port, folder):
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    try:
        # strided split of 5 questions with one padded repeat on rank 1, as a padding sampler would give
        mine = {0: [0, 2, 4], 1: [1, 3, 0]}[rank]
        engine.save_result([{'question_id': q, 'answer': str(q)} for q in mine], folder, 'vqa_result_epoch7',
                           merge=dedup_results)
    finally:
        dist.destroy_process_group()


@pytest.mark.e2e
def test_save_result_merges_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    spawn(_rank_worker, args=(2, port, str(tmp_path)), nprocs=2)
    merged = json.load(open(tmp_path / 'vqa_result_epoch7.json'))
    assert merged == [{'question_id': q, 'answer': str(q)} for q in range(5)]
    check_results(merged, range(5))
    assert len(json.load(open(tmp_path / 'vqa_result_epoch7_rank1.json'))) == 3
