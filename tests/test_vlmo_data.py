"""VLMo's data rules in the shared pipeline: per-caption expansion of pretraining items (VLMo.md §13.2, §17.2 item 13)
by default for `model: vlmo`, ALBEF's per-access caption choice unchanged."""
import json

import pytest
from PIL import Image

from dataset import caption_sampling_of
from dataset.caption_dataset import pretrain_dataset


@pytest.fixture
def annotations(tmp_path):
    Image.new('RGB', (8, 8), (10, 200, 30)).save(tmp_path / 'a.jpg')
    items = [{'image': 'a.jpg', 'caption': ['one red circle', 'a circle', 'red']},
             {'image': 'a.jpg', 'caption': 'a single caption'},
             {'image': 'a.jpg', 'caption': ['two', 'captions']}]
    path = tmp_path / 'pretrain.json'
    path.write_text(json.dumps(items))
    return str(path), str(tmp_path)


def test_per_caption_expansion_gives_one_item_per_caption(annotations):
    path, root = annotations
    expanded = pretrain_dataset(path, lambda im: im.size, root, caption_sampling='per_caption')
    assert len(expanded) == 3 + 1 + 2
    assert [expanded[i][1] for i in range(len(expanded))] == ['one red circle', 'a circle', 'red', 'a single caption',
                                                              'two', 'captions']
    albef = pretrain_dataset(path, lambda im: im.size, root)
    assert len(albef) == 3 and albef[0][1] in ('one red circle', 'a circle', 'red')
    with pytest.raises(ValueError, match='caption_sampling'):
        pretrain_dataset(path, lambda im: im.size, root, caption_sampling='first')


def test_caption_sampling_defaults_by_family():
    assert caption_sampling_of({'model': 'vlmo'}) == 'per_caption'
    assert caption_sampling_of({}) == 'random' and caption_sampling_of({'model': 'simla'}) == 'random'
    assert caption_sampling_of({'model': 'vlmo', 'data': {'caption_sampling': 'random'}}) == 'random'


# ---- VQA answer vocabulary and rest_val (dataset/vqa_vocabulary.py, VLMo.md 13.2) --------------------------------
def vqa_item(qid, image, answers, **extra):
    return {'question_id': qid, 'image': image, 'question': 'q?', 'answer': answers, 'dataset': 'vqa', **extra}


def test_major_answer_is_the_official_one_else_the_most_frequent_normalised():
    from dataset.vqa_vocabulary import major_answer
    assert major_answer(vqa_item(0, 'a', ['cat'] * 9 + ['dog'], multiple_choice_answer='A Dog')) == 'dog'
    assert major_answer(vqa_item(1, 'a', ['two', 'Two', '2', 'two', '2', '2'])) == '2'  # '2' x3 beats 'two' x2
    assert major_answer(vqa_item(2, 'a', ['yes', 'no', 'no', 'yes'])) == 'yes'  # a tie goes to the first given
    assert major_answer(vqa_item(3, 'a', ["Isn't it?", 'x'])) == "isn't it"  # punctuation, contractions


def test_vocabulary_keeps_major_answers_seen_often_enough_in_first_occurrence_order():
    from dataset.vqa_vocabulary import build_vocabulary
    items = ([vqa_item(i, f'p{i}', ['no'] * 10) for i in range(3)] + [vqa_item(9, 'x', ['yes'] * 10)] +
             [vqa_item(10 + i, f'q{i}', ['yes'] * 6 + ['no'] * 4) for i in range(2)] +
             [vqa_item(20 + i, 'vg', ['tree'], dataset='vg') for i in range(5)])
    assert build_vocabulary(items, min_count=3) == ['no', 'yes']  # 'no' seen first; VG answers never count
    assert build_vocabulary(items, min_count=4) == []
    assert build_vocabulary(items, min_count=1) == ['no', 'yes']


def test_rest_val_is_a_fixed_held_out_set_of_val_pictures_and_training_drops_unanswerable_questions():
    from dataset.vqa_vocabulary import build
    train = [vqa_item(i, f't{i}', ['red'] * 10) for i in range(10)] + [vqa_item(99, 't0', ['mauve'] * 10)]
    train += [vqa_item(100, 'vg1', ['red'], dataset='vg')]
    val = [vqa_item(200 + i, f'v{i % 8}', ['blue'] * 9 + ['red']) for i in range(16)]
    out = build(train, val, min_count=2, rest_val=3, seed=0)
    assert out['answer_list'] == ['red', 'blue']  # 'mauve' once: out of the vocabulary
    assert len(out['rest_val_images']) == 3 and set(out['rest_val_images']) < {f'v{i}' for i in range(8)}
    assert out['rest_val_images'] == build(train, val, min_count=2, rest_val=3, seed=0)['rest_val_images']
    assert out['rest_val_images'] != build(train, val, min_count=2, rest_val=3, seed=1)['rest_val_images']
    held = set(out['rest_val_images'])
    assert {i['image'] for i in out['rest_val']} == held and len(out['rest_val']) == 6  # every question of them
    assert not held & {i['image'] for i in out['trainval']}
    ids = [i['question_id'] for i in out['trainval']]
    assert 99 not in ids and 100 not in ids and out['dropped'] == 1  # no in-vocabulary answer; VG never enters
    assert len(ids) == 10 + 10 and len(set(ids)) == len(ids)  # train + the val questions of the other 5 pictures


def test_vocabulary_command_writes_the_files_and_names_a_missing_input(tmp_path, capsys):
    from dataset.vqa_vocabulary import main
    train = tmp_path / 'train.json'
    val = tmp_path / 'val.json'
    train.write_text(json.dumps([vqa_item(i, f't{i}', ['red'] * 10) for i in range(9)]))
    val.write_text(json.dumps([vqa_item(100 + i, f'v{i}', ['red'] * 10) for i in range(4)]))
    out = tmp_path / 'vocab'
    assert main(['--train', str(train), '--val', str(val), '--out_dir', str(out), '--rest_val', '2']) == 0
    assert json.loads((out / 'answer_list.json').read_text()) == ['red']
    assert len(json.loads((out / 'vqa_trainval.json').read_text())) == 11
    assert len(json.loads((out / 'vqa_rest_val.json').read_text())) == 2
    assert len(json.loads((out / 'rest_val_images.json').read_text())) == 2
    assert not list(out.glob('*.tmp'))
    assert 'vqa_num_labels: 1' in capsys.readouterr().err  # 1 answer, not the official 3,129: told how to set it
    with pytest.raises(SystemExit, match='nope.json does not exist'):
        main(['--train', str(tmp_path / 'nope.json'), '--val', str(val), '--out_dir', str(out)])
