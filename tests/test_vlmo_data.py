"""VLMo's data rules in the shared pipeline: per-caption expansion of pretraining items (VLMo.md §13.2, §17.2 item 13)
by default for `model: vlmo`, ALBEF's per-access caption choice unchanged."""
import json

import pytest
import torch
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


# ---- the text pipeline of VLMo.md 3.1 / 3.3: raw strings, the model's own length, stage-2 text lines --------------
LONG = ('A Red, "Circle"!  Next to: two BLUE squares; and ' + ' '.join(f'word{i}' for i in range(60))).strip()


def test_vlmo_texts_reach_the_tokenizer_raw_and_albef_keeps_its_cleaning(annotations, tmp_path):
    from dataset import create_dataset, raw_text_of
    assert raw_text_of({'model': 'vlmo'}) and not raw_text_of({}) and not raw_text_of({'model': 'simla'})
    assert not raw_text_of({'model': 'vlmo', 'data': {'text_cleaning': 'albef'}})
    _, root = annotations
    files = {}
    for name, items in {'pre': [{'image': 'a.jpg', 'caption': LONG}],
                        're_train': [{'image': 'a.jpg', 'caption': LONG, 'image_id': 1}],
                        're_eval': [{'image': 'a.jpg', 'caption': [LONG]}],
                        'vqa': [{'image': 'a.jpg', 'question': 'What Colour, is it?', 'answer': ['red'] * 10,
                                 'dataset': 'vqa', 'question_id': 1}],
                        'nlvr': [{'images': ['a.jpg', 'a.jpg'], 'sentence': LONG, 'label': 'True'}]}.items():
        files[name] = str(tmp_path / f'{name}.json')
        (tmp_path / f'{name}.json').write_text(json.dumps(items))
    base = {'image_res': 16, 'image_root': root, 'vqa_root': root, 'vg_root': root}
    configs = {'pretrain': {'train_file': files['pre']},
               're': {'train_file': files['re_train'], 'val_file': files['re_eval'], 'test_file': files['re_eval']},
               'vqa': {'train_file': files['vqa'], 'test_file': files['vqa'], 'answer_list': files['vqa']},
               'nlvr': {'train_file': files['nlvr'], 'val_file': files['nlvr'], 'test_file': files['nlvr']}}
    (tmp_path / 'answers.json').write_text(json.dumps(['red']))
    configs['vqa']['answer_list'] = str(tmp_path / 'answers.json')
    text_of = {'pretrain': lambda s: s.train[0][1], 're': lambda s: (s.train[0][1], s.val.text[0]),
               'vqa': lambda s: s.train[0][1], 'nlvr': lambda s: s.train[0][2]}
    for task, keys in configs.items():
        vlmo = text_of[task](create_dataset(task, {**base, **keys, 'model': 'vlmo'}))
        albef = text_of[task](create_dataset(task, {**base, **keys}))
        raw = 'What Colour, is it?' if task == 'vqa' else LONG
        assert vlmo == raw or vlmo == (raw, raw), task
        for cleaned in (albef if isinstance(albef, tuple) else (albef,)):
            assert cleaned != raw and ',' not in cleaned and cleaned == cleaned.lower(), task  # pre_caption/question
            if task != 'vqa':
                assert len(cleaned.split(' ')) == 30, task  # ALBEF's 30-word limit


def test_vlmo_pretraining_texts_equal_the_official_fixed_length_tokenisation():
    """Collate at the config's length (dataset.static_shape_options), then VLMo.fixed_length: the ids the official
    tokenizer call gives (`[CLS] pieces [SEP]`, truncation=True, padding='max_length', max_length=L)."""
    from dataset import build_collate_fn, static_shape_options
    from models.losses import vlmo_fixed_length_text
    from models.tokenization import build_tokenizer
    tokenizer = build_tokenizer('none')
    assert static_shape_options({}) == {} and static_shape_options({'max_text_len': 40}) == {'max_length': 40}
    assert static_shape_options({'max_text_len': 40, 'max_text_len_of_initckpt': 196, 'task': 'textmlm'}) == \
        {'max_length': 196}
    texts = [LONG, 'a red circle', LONG.lower()]
    for L in (40, 196):
        collate = build_collate_fn('pretrain', tokenizer, train=True, **static_shape_options(
            {'max_text_len': L, 'max_text_len_of_initckpt': L}))
        _, batch = collate([(torch.zeros(3, 1, 1), t) for t in texts])
        ids, mask = vlmo_fixed_length_text(batch.input_ids, batch.attention_mask, L, tokenizer.sep_token_id)
        official = tokenizer.backend(texts, max_length=L, truncation=True, padding='max_length')
        assert ids.tolist() == official['input_ids'] and mask.tolist() == official['attention_mask'], L
    # ALBEF's pretraining collate keeps its 25 tokens
    _, albef = build_collate_fn('pretrain', tokenizer, train=True)([(torch.zeros(3, 1, 1), LONG)])
    assert albef.input_ids.shape[1] == 25
    vqa = build_collate_fn('vqa', tokenizer, train=True, max_length=40)
    _, questions, *_ = vqa([(torch.zeros(3, 1, 1), LONG, ['a[SEP]'], [1.0])])
    assert questions.input_ids.shape[1] == 40


def test_stage_two_text_lines_are_one_sample_per_line_read_lazily(tmp_path):
    import pickle

    from dataset import create_dataset
    from dataset.text_lines import text_line_dataset
    one, two = tmp_path / 'wiki_0.txt', tmp_path / 'wiki_1.txt'
    one.write_text('First line, as written.\n\n   \nSecond line\n')
    two.write_bytes('caf\u00e9 au lait\r\nlast line without newline'.encode())
    data = create_dataset('pretrain', {'model': 'vlmo', 'task': 'textmlm', 'image_res': 224,
                                       'text_files': [str(one), str(two)]}).train
    assert isinstance(data, text_line_dataset) and len(data) == 4  # blank lines are not samples
    assert [data[i][1] for i in range(4)] == ['First line, as written.', 'Second line', 'caf\u00e9 au lait',
                                              'last line without newline']
    assert data[0][0].shape == (3, 1, 1)
    again = pickle.loads(pickle.dumps(data))  # DataLoader workers get a copy without open files
    assert again[3][1] == 'last line without newline'
    with pytest.raises(FileNotFoundError, match='nope.txt does not exist'):
        text_line_dataset([str(tmp_path / 'nope.txt')])
    (tmp_path / 'blank.txt').write_text('\n\n')
    with pytest.raises(ValueError, match='blank.txt has no non-blank line'):
        text_line_dataset(str(tmp_path / 'blank.txt'))


def test_vlmo_text_pipeline_equals_the_transformers_4_8_1_tokenisation_on_edge_cases():
    """tests/fixtures/vlmo_tokens (made with transformers 4.8.1's BertTokenizer): accents, CJK, emoji, control
    characters, punctuation, empty and over-long texts give the official ids and masks through our pipeline."""
    import os

    from dataset import build_collate_fn, static_shape_options
    from models.losses import vlmo_fixed_length_text
    from models.tokenization import build_tokenizer
    with open(os.path.join(os.path.dirname(__file__), 'fixtures', 'vlmo_tokens', 'golden.json'),
              encoding='utf-8') as f:
        golden = json.load(f)
    tokenizer = build_tokenizer('none')
    collate = build_collate_fn('pretrain', tokenizer, train=True, **static_shape_options({'max_text_len': 40}))
    _, batch = collate([(torch.zeros(3, 1, 1), text) for text in golden['texts']])
    ids, mask = vlmo_fixed_length_text(batch.input_ids, batch.attention_mask, 40, tokenizer.sep_token_id)
    assert ids.tolist() == golden['input_ids'] and mask.tolist() == golden['attention_mask']
