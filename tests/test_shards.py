"""WebDataset shards: make_shards writes what the JSON lists hold, ranks and workers read disjoint shards, a resumed
epoch continues with identical batches, unreadable images are named or skipped, and Pretrain.py trains on shards
and resumes them exactly."""
import hashlib
import io
import json
import random
import shutil
import tarfile
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from dataset import ImageLoadError, ShardedPretrainDataset, build_transform, pre_caption, pretrain_dataset
from dataset import make_shards
from tests.helpers import make_world, pretrain_argv, run_main


def image_digest(image):
    """A 'transform' that identifies an image by its pixels."""
    return hashlib.sha1(image.tobytes()).hexdigest()


def keep(batch):
    return batch


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp('world'), scale=0.05, seed=0)


@pytest.fixture(scope='module')
def shards(world, tmp_path_factory):
    out = tmp_path_factory.mktemp('shards')
    index = make_shards.main(['--ann', str(world / 'pretrain.json'), '--image_root', str(world), '--out', str(out),
                              '--shard_size', '10'])
    return out, index


def test_shards_hold_the_same_samples_as_the_json_lists(world, shards):
    out, index = shards
    assert index['total'] == 150 and [s['samples'] for s in index['shards']] == [10] * 15
    assert not list(out.glob('.*.tmp'))
    json_set = pretrain_dataset([str(world / 'pretrain.json')], image_digest, str(world))
    expected, allowed = Counter(), defaultdict(set)
    for i, ann in enumerate(json_set.ann):
        digest, _ = json_set[i]
        expected[digest] += 1
        captions = ann['caption'] if isinstance(ann['caption'], list) else [ann['caption']]
        allowed[digest] |= {pre_caption(c, 30) for c in captions}
    shard_set = ShardedPretrainDataset(str(out), image_digest, batch_size=5, shuffle_buffer=8)
    assert len(shard_set) == 30
    seen = Counter()
    for batch in shard_set:
        assert len(batch) == 5
        for digest, caption in batch:
            seen[digest] += 1
            assert caption in allowed[digest]
    assert seen == expected  # one epoch = every sample of the JSON lists once


def test_ranks_and_workers_read_disjoint_shards(shards):
    out, _ = shards
    # 15 shards over 2 ranks x 2 workers; 120 samples per epoch = 6 batches of 5 per reader, within every reader's
    # shards, so no sample may repeat
    shard_set = ShardedPretrainDataset(str(out), image_digest, batch_size=5, epoch_samples=120, shuffle_buffer=4)
    seen = Counter()
    for rank in range(2):
        shard_set.set_position(0, 0, seed=3)
        shard_set.rank, shard_set.world_size = rank, 2
        batches = list(DataLoader(shard_set, batch_size=None, num_workers=2, collate_fn=keep))
        assert len(batches) == len(shard_set) == 12
        seen.update(digest for batch in batches for digest, _ in batch)
    assert sum(seen.values()) == 120 and max(seen.values()) == 1


def test_a_resumed_epoch_continues_with_identical_batches(shards):
    out, _ = shards
    shard_set = ShardedPretrainDataset(str(out), build_transform('pretrain', 32), batch_size=4, shuffle_buffer=16)

    def epoch(start, workers):
        shard_set.set_position(1, start, seed=7)
        return list(DataLoader(shard_set, batch_size=None, num_workers=workers, collate_fn=default_collate))

    full, resumed = epoch(0, 2), epoch(5, 2)  # an odd start: DataLoader worker 0 plays logical worker 1
    assert len(full) == len(shard_set) == 37 and len(resumed) == 32
    for (image_a, text_a), (image_b, text_b) in zip(full[5:], resumed):
        assert torch.equal(image_a, image_b) and text_a == text_b
    # read in the main process, the training RNG streams are left as they were
    state = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    shard_set.set_position(1, 35, seed=7)
    assert len(list(shard_set)) == 2
    assert torch.equal(state[0], torch.get_rng_state())
    assert (state[1] == np.random.get_state()[1]).all() and state[2] == random.getstate()


def write_shard(path, samples):
    with tarfile.open(path, 'w') as tar:
        for key, ext, data in samples:
            info = tarfile.TarInfo(f'{key}.{ext}')
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_an_unreadable_image_in_a_shard_is_named_or_skipped(world, tmp_path):
    good = (world / 'images' / 'train_000001.jpg').read_bytes()
    meta = json.dumps({'caption': 'a white diamond', 'image': 'images/x.jpg'}).encode()
    samples = []
    for key in ('000000000', '000000001', '000000002'):
        samples += [(key, 'jpg', b'not a jpeg' if key == '000000001' else good), (key, 'json', meta)]
    write_shard(tmp_path / 'bad.tar', samples)
    (tmp_path / 'index.json').write_text(json.dumps({'shards': [{'name': 'bad.tar', 'samples': 3}]}))
    with pytest.raises(ImageLoadError, match=r'sample 000000001 of shard .*bad\.tar \(source image images/x\.jpg\)'):
        list(ShardedPretrainDataset(str(tmp_path), image_digest, batch_size=3, shuffle_buffer=0))
    skipping = ShardedPretrainDataset(str(tmp_path), image_digest, batch_size=3, shuffle_buffer=0,
                                      skip_bad_images=True)
    with pytest.warns(UserWarning, match='skipped unreadable image'):
        batches = list(skipping)
    assert len(batches) == 1 and len(batches[0]) == 3 and skipping.num_skipped == 1


def test_make_shards_reencodes_smaller_and_skips_missing_images(world, tmp_path):
    items = json.load(open(world / 'pretrain.json'))[:6] + [{'image': 'images/missing.jpg', 'caption': 'gone'}]
    ann = tmp_path / 'ann.json'
    ann.write_text(json.dumps(items))
    base = ['--ann', str(ann), '--image_root', str(world), '--shard_size', '3']
    with pytest.raises(ImageLoadError, match='missing.jpg.*annotation index 6'):
        make_shards.main(base + ['--out', str(tmp_path / 'strict')])
    assert not (tmp_path / 'strict' / 'index.json').exists()  # an unfinished conversion has no index
    index = make_shards.main(base + ['--out', str(tmp_path / 'small'), '--max_size', '24', '--skip_bad_images'])
    assert index['total'] == 6 and [s['image'].endswith('missing.jpg') for s in index['skipped']] == [True]
    sizes = []
    for shard in index['shards']:
        with tarfile.open(tmp_path / 'small' / shard['name']) as tar:
            for member in tar.getmembers():
                if member.name.endswith('.jpg'):
                    sizes.append(min(Image.open(tar.extractfile(member)).size))
    assert len(sizes) == 6 and set(sizes) == {24}


@pytest.mark.e2e
def test_pretrain_on_shards_resumes_exactly(world, shards, tmp_path):
    out_dir, _ = shards
    # no root: the shards replace train_file; val_file null and a random ViT (init_deit false) are pretrain_argv's own
    opts = {'train_shards': str(out_dir), 'num_workers': 2, 'batch_size': 4, 'queue_size': 32,
            'max_steps_per_epoch': 4, 'schedular.epochs': 2, 'checkpoint_every_steps': 2, 'log_every': 1}

    def run(out, *extra):
        run_main('Pretrain', pretrain_argv(None, out, seed=9, **opts) + list(extra))

    full = tmp_path / 'full'
    run(full)
    cut = tmp_path / 'cut'
    cut.mkdir()
    shutil.copy(full / 'checkpoint_01_step000002.pth', cut)  # as if killed after step 2 of epoch 1
    run(cut, '--resume', 'auto')
    a = torch.load(full / 'checkpoint_01.pth', weights_only=True)
    b = torch.load(cut / 'checkpoint_01.pth', weights_only=True)
    assert a['global_step'] == b['global_step'] == 8
    for key, value in a['model'].items():
        assert torch.equal(value, b['model'][key]), key
