"""Learning check through Retrieval.py on CPU: fine-tuning a tiny pretrained checkpoint raises retrieval R@1 over
the same checkpoint evaluated zero-shot, by a margin measured beforehand (docs/README_retrieval.md).

Why this protocol: a tiny ALBEF pretrained for a CI budget on the synthetic world is at chance on held-out pictures,
its text CLS features nearly identical for every caption, and held-out retrieval needs far more fine-tuning steps
than the budget allows. So the check fine-tunes on the captions of a few training pictures and retrieves among those
same pictures: it shows that the objective, the checkpoint conversion (including the 64 -> 32 px position resize)
and the two-stage evaluation work together, not how well the tiny model generalises. The checkpoint is a short
Pretrain.py run with configs/Pretrain_synthetic.yaml (the longer run of tests/conftest.py collapses further and
does not move within this budget; see the measurements in docs/README_retrieval.md).
"""
import collections
import json
import os

import pytest

import Retrieval
from tests.helpers import REPO, make_world, opts, run_pretrain
from engine.config import load_config

WORLD_SCALE, PRETRAIN_STEPS = 0.1, 10
N_IMAGES, STEPS, BATCH = 8, 150, 8
# 32 px and a fast-moving teacher without distillation keep the run short; the rest is configs/Retrieval_synthetic.yaml
RUN = {'image_res': 32, 'batch_size_train': BATCH, 'momentum': 0.9, 'distill': False, 'k_test': 8,
       'optimizer.lr': 1e-3, 'schedular.warmup_lr': 1e-3, 'schedular.epochs': 1, 'max_steps_per_epoch': STEPS,
       'num_workers': 0}
# mean(txt_r1, img_r1) went 6.25 -> 18.75 / 18.75 / 29.17 (seeds 0, 1, 2); r_mean +16.7 / +19.4 / +24.3.
# Re-run on 2026-12-02 (an Intel Xeon instead of the AMD EPYC above, fresh environment, same code and seed 0): R@1 margin met, r_mean only +3.5 (50.0 -> 53.5).
# Among 8 pictures R@5 and R@10 are near their ceiling by chance (R@5 of one picture in 8: 62.5%), so r_mean is
# asserted not to fall and the margin is asserted on R@1, which has room to move.
MARGIN_R1 = 6.0
PRETRAIN_AS_MEASURED = {'mlm_probability': 0.15, 'alpha': 0.4, 'optimizer.lr': 3e-4, 'schedular.lr': 3e-4}


@pytest.mark.unit
def test_synthetic_configs_share_the_pretraining_model():
    pretrain = load_config(os.path.join(REPO, 'configs', 'Pretrain_synthetic.yaml'))
    for name in ('Retrieval_synthetic.yaml', 'Grounding_synthetic.yaml'):
        config = load_config(os.path.join(REPO, 'configs', name))
        for key in ('vit', 'bert_config', 'embed_dim', 'vision_width', 'image_res', 'queue_size'):
            assert config[key] == pretrain[key], (name, key)


@pytest.fixture(scope='module')
def short_pretrained(tmp_path_factory):
    """(checkpoint, world root): a small synthetic world and PRETRAIN_STEPS steps of Pretrain.py on it."""
    base = tmp_path_factory.mktemp('short_pretrained')
    root = make_world(base / 'synthetic', scale=WORLD_SCALE, seed=0)
    # a random ViT (init_deit false), no zero-shot check (val_file null). The margins were measured from this start
    # point, with the official pretraining objective settings that configs/Pretrain_synthetic.yaml had then; the
    # config's grounding recipe (mlm_probability 0.4, alpha 0, lr 1e-3: docs/README_synthetic.md) gives a different
    # 10-step checkpoint, from which one run met the R@1 margin but not the r_mean one (48.6 vs 50.0)
    checkpoint = run_pretrain(root, base / 'pretrain', seed=42, steps=PRETRAIN_STEPS, epochs=1, num_workers=0,
                              **PRETRAIN_AS_MEASURED)
    return checkpoint, str(root)


def seen_subset(root, out_dir, n_images):
    """The captions of the first `n_images` training pictures, as a training file and as an evaluation file."""
    with open(os.path.join(root, 'retrieval_train.json')) as f:
        train = json.load(f)
    keep = set(list(dict.fromkeys(item['image_id'] for item in train))[:n_images])
    subset = [item for item in train if item['image_id'] in keep]
    captions = collections.OrderedDict()
    for item in subset:
        captions.setdefault(item['image'], []).append(item['caption'])
    paths = str(out_dir / 'train.json'), str(out_dir / 'eval.json')
    with open(paths[0], 'w') as f:
        json.dump(subset, f)
    with open(paths[1], 'w') as f:
        json.dump([{'image': image, 'caption': caps} for image, caps in captions.items()], f)
    return paths, len(subset)


def test_fine_tuning_raises_r1_over_zero_shot(short_pretrained, tmp_path):
    checkpoint, root = short_pretrained
    (train, evaluation), n_items = seen_subset(root, tmp_path, N_IMAGES)
    repeats = -(-STEPS * BATCH // n_items)  # the file listed often enough for one epoch of STEPS batches
    common = ['--config', os.path.join(REPO, 'configs', 'Retrieval_synthetic.yaml'), '--text_encoder', 'none',
              '--device', 'cpu', '--seed', '0', '--checkpoint', checkpoint,
              *opts(train_file='[' + ','.join([train] * repeats) + ']', val_file=evaluation, test_file=evaluation,
                    image_root=root, **RUN)]
    results = {}
    for name, extra in (('zero_shot', ['--evaluate']), ('fine_tuned', [])):
        out = tmp_path / name
        Retrieval.main(Retrieval.parser().parse_args(common + extra + ['--output_dir', str(out)]))
        with open(out / 'metrics.json') as f:
            results[name] = json.load(f)['test']
    before, after = results['zero_shot'], results['fine_tuned']
    r1 = {name: (m['txt_r1'] + m['img_r1']) / 2 for name, m in results.items()}
    assert r1['fine_tuned'] - r1['zero_shot'] >= MARGIN_R1, (before, after)
    assert after['r_mean'] >= before['r_mean'], (before, after)
