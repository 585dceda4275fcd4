"""The image-blind control switch (`image_blind: fixed | shuffled`, docs/README_synthetic.md): one config key that
every entry script gets through create_dataset, making each split's pictures uninformative about its texts while
texts, labels, answers and ids stay as annotated."""
import collections
import json
import os

import pytest
import torch

from dataset import create_dataset
from dataset.image_io import blind_order, make_image_blind
from engine.config import ConfigError, load_config
from tests.helpers import REPO, make_world

TASK_CONFIG = {'pretrain': 'Pretrain', 're': 'Retrieval', 'vqa': 'VQA', 'nlvr': 'NLVR', 've': 'VE',
               'grounding': 'Grounding'}
TEXT_KEYS = ('caption', 'question', 'answer', 'question_id', 'sentence', 'label', 'text', 'ref_id', 'image_id')


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    return str(make_world(tmp_path_factory.mktemp('blind_world'), scale=0.02, seed=0))


def world_config(task, root, **keys):
    """The task's synthetic config pointed at `root`, with --opt style overrides."""
    overrides = [f'{k}={v}' for k, v in keys.items()]
    config = load_config(os.path.join(REPO, 'configs', f'{TASK_CONFIG[task]}_synthetic.yaml'), overrides)
    for key, value in list(config.items()):
        if isinstance(value, str) and value.startswith('data/synthetic'):
            config[key] = root + value[len('data/synthetic'):]
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            config[key] = [root + v[len('data/synthetic'):] if v.startswith('data/synthetic') else v for v in value]
    return config


def pictures(item):
    return tuple(str(item[k]) for k in ('dataset', 'image', 'images') if k in item)


def texts(item):
    return {k: item[k] for k in TEXT_KEYS if k in item}


def test_the_key_is_a_config_switch():
    path = os.path.join(REPO, 'configs', 'VQA_synthetic.yaml')
    assert 'image_blind' not in load_config(path)  # off unless asked for; official configs never name it
    assert load_config(path, ['image_blind=fixed'])['image_blind'] == 'fixed'
    assert load_config(path, ['image_blind=shuffled', 'image_blind_seed=3'])['image_blind_seed'] == 3
    assert load_config(path, ['image_blind=null'])['image_blind'] is None
    with pytest.raises(ConfigError):
        load_config(path, ['image_blind=sideways'])


@pytest.mark.parametrize('task', sorted(TASK_CONFIG))
def test_fixed_gives_every_item_one_picture_and_keeps_the_texts(task, world):
    plain = create_dataset(task, world_config(task, world))
    blind = create_dataset(task, world_config(task, world, image_blind='fixed'))
    for before, after in zip(plain, blind):
        if before is None:
            assert after is None
            continue
        assert len(after) == len(before)
        assert {pictures(item) for item in after.ann} == {pictures(before.ann[0])}
        assert [texts(item) for item in after.ann] == [texts(item) for item in before.ann]
    assert len({pictures(item) for item in plain.train.ann}) > 1  # the control differs from the run


@pytest.mark.parametrize('task', sorted(TASK_CONFIG))
def test_shuffled_moves_every_picture_and_keeps_the_texts(task, world):
    plain = create_dataset(task, world_config(task, world))
    blind = create_dataset(task, world_config(task, world, image_blind='shuffled'))
    again = create_dataset(task, world_config(task, world, image_blind='shuffled'))
    other = create_dataset(task, world_config(task, world, image_blind='shuffled', image_blind_seed=1))
    for before, after, same, different in zip(plain, blind, again, other):
        if before is None:
            continue
        old, new = [pictures(i) for i in before.ann], [pictures(i) for i in after.ann]
        assert collections.Counter(new) == collections.Counter(old)  # the same pictures, other texts
        moved = sum(a != b for a, b in zip(old, new)) / len(old)
        assert moved >= 0.75, (task, moved)  # measured >= 0.9 here; only pictures shared by several items return
        assert [texts(item) for item in after.ann] == [texts(item) for item in before.ann]
        assert [pictures(i) for i in same.ann] == new  # deterministic from image_blind_seed
        assert [pictures(i) for i in different.ann] != new


def test_blind_order_is_one_cycle_without_fixed_points():
    for size in (2, 3, 10, 97):
        source = blind_order(size, seed=5)
        assert sorted(source) == list(range(size)) and all(source[i] != i for i in range(size))
        seen, i = set(), 0
        while i not in seen:
            seen.add(i)
            i = source[i]
        assert len(seen) == size
    assert blind_order(10, 0) == blind_order(10, 0) != blind_order(10, 1)


def test_loaded_tensors_are_one_picture_under_fixed(world):
    """Through __getitem__ (test transform: no randomness): every VQA test item returns the same image tensor."""
    test = create_dataset('vqa', world_config('vqa', world, image_blind='fixed')).test
    first = test[0][0]
    assert all(torch.equal(test[i][0], first) for i in range(len(test)))
    plain = create_dataset('vqa', world_config('vqa', world)).test
    assert not all(torch.equal(plain[i][0], plain[0][0]) for i in range(len(plain)))
    questions = [plain[i][1] for i in range(len(plain))]
    assert [test[i][1] for i in range(len(test))] == questions


def test_retrieval_eval_picture_list_follows(world):
    test = create_dataset('re', world_config('re', world, image_blind='shuffled')).test
    assert test.image == [item['image'] for item in test.ann]


def test_unknown_mode_and_datasets_without_annotations_are_refused():
    class NoAnn(torch.utils.data.Dataset):
        pass

    with pytest.raises(ValueError, match='image_blind'):
        make_image_blind(NoAnn(), 'fixed')
    with pytest.raises(ValueError, match='image_blind'):
        make_image_blind(NoAnn(), 'upside_down')
    assert make_image_blind(NoAnn(), None).__class__ is NoAnn


def test_question_kind_prior_of_scripts_vqa_prior():
    """scripts/vqa_prior.py, the image-blind VQA reference the demo prints: per question kind (first three words) the
    most frequent training answer, scored with the VQA accuracy."""
    from scripts.vqa_prior import prior_accuracy

    def item(qid, question, answer):
        return {'question_id': qid, 'question': question, 'answer': [answer] * 10}

    train = [item(0, 'how many shapes are there?', '2'), item(1, 'how many shapes are in it?', '2'),
             item(2, 'is there a red circle?', 'no'), item(3, 'is there a blue star?', 'no'),
             item(4, 'is there a red star?', 'no'), item(5, 'what color is the star?', 'red')]
    test = [item(6, 'how many shapes are there?', '2'), item(7, 'is there a green cross?', 'yes'),
            item(8, 'what color is the circle?', 'blue'), item(9, 'what shape is the red one?', 'star')]
    result = prior_accuracy(train, test)
    # '2' right, 'no' wrong, 'red' wrong, an unseen kind gets the overall 'no': wrong
    assert result['kind_prior'] == pytest.approx(25.0) and result['questions'] == 4
    assert result['most_common_answer'] == 'no' and result['most_common'] == pytest.approx(0.0)


def test_demo_report_puts_every_task_beside_its_control(world, tmp_path, capsys):
    """scripts/demo_report.py, the demo's closing table: the numbers of the run folders scripts/demo.sh writes, each
    task's image-blind run beside it, the model-free references from the world's files; missing runs left out."""
    from scripts.demo_report import main

    def write(name, metrics, **extra):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / 'metrics.json', 'w') as f:
            json.dump({'metrics': metrics, **extra}, f)

    os.makedirs(tmp_path / 'pretrain')
    (tmp_path / 'pretrain' / 'log.txt').write_text(json.dumps({'zeroshot_txt_r1': 1.0, 'zeroshot_img_r1': 2.0}) + '\n'
                                                  + json.dumps({'zeroshot_txt_r1': 31.25, 'zeroshot_img_r1': 28.5}))
    write('retrieval', {}, test={'txt_r1': 40.0, 'img_r1': 35.0})
    write('vqa', {'test_vqa_acc': 49.4})
    write('vqa_blind', {'test_vqa_acc': 41.4})
    write('ve', {'val_acc': 0.753, 'test_acc': 0.737})
    write('nlvr', {'val_acc': 0.57, 'test_acc': 0.59})
    write('nlvr_blind', {'val_acc': 0.5, 'test_acc': 0.48})
    splits = ('val_d', 'testA_d', 'testB_d')
    write('grounding', {}, accuracy=dict(zip(splits, (0.3, 0.31, 0.32))),
          random_proposal=dict(zip(splits, (0.18, 0.19, 0.18))))
    write('grounding_blind', {}, accuracy=dict(zip(splits, (0.1, 0.11, 0.12))))
    table = {row[0]: row[2:] for row in main(['--out', str(tmp_path), '--root', world])}
    with open(os.path.join(world, 'retrieval_test.json')) as f:
        chance = f'chance {100 / len(json.load(f)):.1f}'
    assert table['pretraining, zero-shot (ITC only)'] == ('31.2 / 28.5', chance, '')
    assert table['retrieval fine-tuned, ITM re-ranked'] == ('40.0 / 35.0', chance, '')
    assert 'retrieval zero-shot, ITM re-ranked' not in table  # not run: left out
    assert table['VQA'][:2] == ('49.4', '41.4') and table['VQA'][2].startswith('question-kind prior')
    assert table['SNLI-VE'][:2] == ('75.3 / 73.7', 'not run')
    assert table['NLVR2'] == ('57.0 / 59.0', '50.0 / 48.0', 'majority 50.0 / 50.0')
    assert table['grounding (ITM Grad-CAM)'] == ('30.0 / 31.0 / 32.0', '10.0 / 11.0 / 12.0',
                                                 'random proposal 18.0 / 19.0 / 18.0')
    assert 'NLVR2' in capsys.readouterr().out
