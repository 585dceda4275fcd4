"""Every task of the synthetic benchmark beats its image-blind control (issue #13): each fine-tuned model is evaluated
twice, with the pictures and with one fixed picture for every item (`image_blind=fixed`), and the margin between the
two is asserted; VQA also beats the question-kind prior (scripts/vqa_prior.py), a model-free image-blind reference.

The runs are tests/margin_runs.py's: fine-tuning through the entry scripts from a committed demo-length pretraining
(tests/fixtures/synthetic_pretrained/albef_demo_seed42.pth, synthetic/pretrained.py), in the background of
`make test` (`make test-margins` runs this file alone). Grounding's margins are asserted from the CI-length
pretraining in tests/test_grounding_learning.py, pretraining's (zero-shot ITC far above chance) in
tests/test_pretrain_learning.py.

The numbers beside each assertion were measured (2026-12-03 and 2026-12-04) with exactly these settings (fine-tuning
seed 42, one CPU thread) and with other fine-tuning seeds; the asserted margins are about half the smallest measured
one, leaving room for another CPU's rounding. docs/README_synthetic.md (sixth and seventh rounds) has the tables.
"""
import json
import os

import pytest
import torch

import engine.config as engine_config
from models.checkpoint import QUEUE_KEYS, is_momentum_key
from scripts.vqa_prior import prior_accuracy
from synthetic import pretrained as stored
from synthetic.world import FORMAT_VERSION
from tests import margin_runs as settings
from tests.helpers import REPO

PRETRAIN_CONFIG = os.path.join(REPO, 'configs', 'Pretrain_synthetic.yaml')


def metrics(folder):
    with open(os.path.join(folder, 'metrics.json')) as f:
        return json.load(f)


def load(root, name):
    with open(os.path.join(root, name)) as f:
        return json.load(f)


# ---- the committed pretraining ---------------------------------------------------------------------------------

@pytest.mark.unit
def test_the_fixture_is_the_demo_pretraining_of_this_world_and_model():
    info = stored.load_info(settings.FIXTURE)
    assert info['world'] == {'generator': 'synthetic.world', 'format_version': FORMAT_VERSION, 'seed': 0, 'scale': 1.0}
    config = engine_config.load_config(PRETRAIN_CONFIG)
    for key in ('vit', 'bert_config', 'embed_dim', 'vision_width', 'image_res', 'mlm_probability', 'alpha',
                'optimizer', 'schedular'):
        assert info['config'][key] == config[key], key
    assert info['epoch'] == config['schedular']['epochs'] - 1 and info['seed'] == 42
    # the run's zero-shot ITC check on the held-out test split, logged by Pretrain.py (chance 0.7)
    assert info['log'][-1]['zeroshot_txt_r1'] > 30 and info['log'][-1]['zeroshot_img_r1'] > 30


@pytest.mark.unit
def test_the_shapes_fixture_is_its_recipe_on_this_world_and_model():
    """The second committed pretraining: the synthetic config for 24 epochs with the ViT frozen (lr_mult_visual 0),
    from the 60-epoch per-cell stand-in (tests/fixtures/synthetic_pretrained/README.md)."""
    info = stored.load_info(settings.FIXTURE_SHAPES)
    assert info['world'] == {'generator': 'synthetic.world', 'format_version': FORMAT_VERSION, 'seed': 0, 'scale': 1.0}
    config = engine_config.load_config(PRETRAIN_CONFIG)
    for key in ('vit', 'bert_config', 'embed_dim', 'vision_width', 'image_res', 'mlm_probability', 'alpha',
                'optimizer'):
        assert info['config'][key] == config[key], key
    assert info['config']['schedular'] == {**config['schedular'], 'epochs': 24}
    assert info['config']['lr_mult_visual'] == 0 and 'lr_mult_visual' not in config
    assert info['epoch'] == 23 and info['seed'] == 2


@pytest.mark.unit
def test_the_fixture_loads_into_the_synthetic_model_with_only_momentum_and_queues_missing():
    from models.model_pretrain import ALBEF
    from tests.parity_utils import StubTokenizer
    model = ALBEF(config=engine_config.load_config(PRETRAIN_CONFIG), text_encoder=None, tokenizer=StubTokenizer(),
                  init_deit=False)
    sd = torch.load(settings.FIXTURE, map_location='cpu', weights_only=True)['model']
    expected = {k: v.shape for k, v in model.state_dict().items() if not is_momentum_key(k) and k not in QUEUE_KEYS}
    assert {k: v.shape for k, v in sd.items()} == expected
    assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())


@pytest.mark.unit
def test_compact_then_expand_keeps_the_weights_ties_and_refuses_another_world(tmp_path):
    decoder = torch.nn.Linear(4, 3)
    sd = {'text_encoder.w': decoder.weight, 'text_encoder.tied': decoder.weight, 'text_encoder.b': decoder.bias,
          'text_encoder_m.w': decoder.weight.clone(), 'image_queue': torch.randn(4, 2),
          'step': torch.tensor(3)}
    torch.save({'model': sd, 'epoch': 1, 'seed': 7, 'config': {'a': 1}}, tmp_path / 'checkpoint_last.pth')
    (tmp_path / 'log.txt').write_text('{"epoch": 1, "zeroshot_txt_r1": 5.0}\n')
    world = tmp_path / 'world'
    world.mkdir()
    manifest = {'generator': 'synthetic.world', 'format_version': 2, 'seed': 0, 'scale': 1.0, 'pictures': {}}
    (world / 'manifest.json').write_text(json.dumps(manifest))
    stored.compact(tmp_path / 'checkpoint_last.pth', world, tmp_path / 'small.pth')
    small = torch.load(tmp_path / 'small.pth', weights_only=True)
    assert set(small['model']) == {'text_encoder.w', 'text_encoder.tied', 'text_encoder.b', 'step'}
    assert small['model']['text_encoder.w'].data_ptr() == small['model']['text_encoder.tied'].data_ptr()
    assert small['info']['log'] == [{'epoch': 1, 'zeroshot_txt_r1': 5.0}] and small['info']['seed'] == 7
    stored.expand(tmp_path / 'small.pth', tmp_path / 'expanded.pth', root=world)
    expanded = torch.load(tmp_path / 'expanded.pth', weights_only=True)['model']
    assert expanded['text_encoder.w'].dtype == torch.float32 and torch.equal(expanded['step'], torch.tensor(3))
    torch.testing.assert_close(expanded['text_encoder.w'], decoder.weight.detach(), rtol=1e-3, atol=1e-4)
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'manifest.json').write_text(json.dumps({**manifest, 'seed': 1}))
    with pytest.raises(ValueError, match=r'trained on the synthetic world .*python -m synthetic\.pretrained'):
        stored.expand(tmp_path / 'small.pth', tmp_path / 'refused.pth', root=other)
    assert not os.path.exists(tmp_path / 'refused.pth')
    with pytest.raises(ValueError, match=r'not a file of synthetic\.pretrained'):
        stored.load_info(tmp_path / 'checkpoint_last.pth')


def test_zero_shot_retrieval_beats_its_image_blind_control(margin_runs):
    """The pretrained model ranks the 150 held-out pictures and their captions (ITC, then ITM re-ranking of 16)."""
    seen = metrics(margin_runs.runs['retrieval_zero_shot'])['test']
    blind = metrics(margin_runs.runs['retrieval_zero_shot_blind'])['test']
    # measured TR@1 / IR@1: 38.0 / 28.1 against 0.7 / 0.9 with one fixed picture (chance 0.7); no fine-tuning, so no
    # seed to vary
    assert seen['txt_r1'] >= blind['txt_r1'] + 15 and seen['img_r1'] >= blind['img_r1'] + 12, (seen, blind)


def test_zero_shot_itm_reranking_beats_itc_alone_from_a_pretraining_that_keeps_the_shapes(margin_runs):
    """The paper's two-stage retrieval: ITM re-ranking ITC's top 16 (k_test) ranks better than ITC alone (k_test 1).
    From the demo-length pretraining it does not (its ITM learns colours only; docs/README_synthetic.md, seventh to
    ninth rounds); from a pretraining whose ViT keeps the stand-in's shapes, long enough for ITM to use them, it
    does."""
    itm = metrics(margin_runs.runs['retrieval_zero_shot_shapes'])['test']
    itc = metrics(margin_runs.runs['retrieval_zero_shot_shapes_itc'])['test']
    # measured TR@1 / IR@1 (float16-stored fixture, pretraining seed 2): ITM re-ranked 62.7 / 54.9 against ITC alone
    # 50.7 / 47.2; the same recipe at pretraining seeds 42 and 1: 57.3 / 57.3 against 47.3 / 45.5, 60.7 / 56.8
    # against 62.7 / 51.4 (ITM behind on TR@1 there by 3 of 150 pictures, ahead on IR@1 at all three seeds)
    assert itm['txt_r1'] >= itc['txt_r1'] + 4 and itm['img_r1'] >= itc['img_r1'] + 4, (itm, itc)


def test_fine_tuned_retrieval_beats_its_image_blind_control(margin_runs):
    seen = metrics(margin_runs.runs['retrieval'])['test']
    blind = metrics(margin_runs.runs['retrieval_blind'])['test']
    # measured after 20 steps: 34.7 / 29.3 against 0.7 / 0.9 (fine-tuning seed 0: 34.7 / 26.7 against 0.7 / 0.9)
    assert seen['txt_r1'] >= blind['txt_r1'] + 15 and seen['img_r1'] >= blind['img_r1'] + 12, (seen, blind)


def test_vqa_beats_its_image_blind_control_and_the_question_kind_prior(margin_runs):
    root = margin_runs.root
    seen = metrics(margin_runs.runs['vqa'])['metrics']
    blind = metrics(margin_runs.runs['vqa_blind'])['metrics']
    prior = prior_accuracy(load(root, 'vqa_train.json'), load(root, 'vqa_test.json'))
    assert seen['test_vqa_scored'] == blind['test_vqa_scored'] == len(load(root, 'vqa_test.json'))
    # measured on the 600 test questions: 48.65 against 40.63 with one fixed picture (fine-tuning seeds 0 and 1: 46.52
    # against 40.33, 47.17 against 38.40); question-kind prior 45.1. Its margin over the prior (+3.5; +1.4 and +2.1 at
    # the other seeds) is the thin one: the full config (batch 32) reached 49.3 from the same start
    assert seen['test_vqa_acc'] >= blind['test_vqa_acc'] + 3.0, (seen, blind)
    assert seen['test_vqa_acc'] >= prior['kind_prior'] + 0.5, (seen, prior)


def accuracies(folder):
    m = metrics(folder)['metrics']
    return 100 * m['val_acc'], 100 * m['test_acc']


def test_ve_beats_its_image_blind_control(margin_runs):
    seen, blind = accuracies(margin_runs.runs['ve']), accuracies(margin_runs.runs['ve_blind'])
    # measured dev / test after 2 epochs (dev-selected): 76.0 / 71.0 against 69.3 / 66.3 with one fixed picture
    # (fine-tuning seed 0: 75.3 / 70.7 against 70.0 / 67.7; seed 1: 74.3 / 71.7 against 69.3 / 66.0); majority 33.3,
    # the "neutral is recognisable from its words" text prior 66.7
    assert seen[0] >= blind[0] + 1.5 and seen[1] >= blind[1] + 1.5, (seen, blind)


def test_nlvr_beats_its_image_blind_control(margin_runs):
    seen, blind = accuracies(margin_runs.runs['nlvr']), accuracies(margin_runs.runs['nlvr_blind'])
    # measured dev / test-P (text assignment 1 epoch, NLVR2 2 epochs at 64 px, dev-selected): 57.3 / 53.3 against
    # 49.7 / 50.0 with one fixed picture (fine-tuning seed 0: 57.3 / 53.0 against 49.3 / 49.3; seed 1: 56.3 / 56.0
    # against 50.3 / 51.0); majority 50.0
    assert seen[0] >= blind[0] + 1.5 and seen[1] >= blind[1] + 1.5, (seen, blind)
