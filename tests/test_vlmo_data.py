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
