"""VLMo fine-tuning through VQA.py and NLVR.py (models/vlmo_tasks.py, registered in models/registry.py): the VQA soft
targets from the shared batch, the vocabulary-size refusal, one training step of each task, the VQA prediction hook,
loading a stage-3 checkpoint, the image normalisation switch, and both scripts end to end on a small synthetic world."""
import json
import os

import pytest
import torch

from dataset import build_collate_fn, build_transform, create_dataset
from dataset.collate import VQACollator
from dataset.transforms import NORMALIZATIONS
from dataset.vqa_dataset import answer_weights
from engine.config import load_config
from models import registry
from models.tokenization import build_tokenizer
from models.vlmo_tasks import VQATargets, answer_score, check_vocabulary, evaluate_vqa, make_vqa_step
from tests.helpers import REPO, make_world, opts, run_forked

CONFIGS = os.path.join(REPO, 'configs', 'vlmo')
ANSWERS = ['yes', 'no', 'blue', 'navy', 'purple', 'dark green']


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """A small synthetic world (the same generator as the session's synthetic_root, at 5 % of its size)."""
    return make_world(tmp_path_factory.mktemp('vlmo_ft_world'), scale=0.05, seed=0)


@pytest.fixture(scope='module')
def tokenizer():
    return build_tokenizer('none')


def world_config(name, root, **over):
    """configs/vlmo/<name>_synthetic.yaml with the data under `root` (and vqa_num_labels = its answer count)."""
    config = load_config(os.path.join(CONFIGS, f'{name}_synthetic.yaml'))
    if name == 'VQA':
        config.update(train_file=[f'{root}/vqa_train.json'], test_file=[f'{root}/vqa_test.json'],
                      answer_list=f'{root}/answer_list.json', vqa_root=str(root), vg_root=str(root))
    else:
        config.update(train_file=[f'{root}/nlvr_train.json'], val_file=[f'{root}/nlvr_dev.json'],
                      test_file=[f'{root}/nlvr_test.json'], image_root=str(root))
    config.update(num_workers=0, **over)
    if name == 'VQA' and 'vqa_num_labels' not in over:
        with open(config['answer_list']) as f:
            config['vqa_num_labels'] = len(json.load(f))
    return config


def vqa_item(answers, dataset='vqa'):
    """A training item as vqa_dataset.load_item gives it (answers + eos and their weights)."""
    if dataset == 'vg':
        unique, weights = [answers], [0.5]
    else:
        unique, weights = answer_weights(answers)
    return torch.zeros(3, 48, 48), 'what colour is it?', [a + '[SEP]' for a in unique], weights


def write_answers(tmp_path, answers=ANSWERS):
    path = tmp_path / 'answer_list.json'
    path.write_text(json.dumps(answers))
    return str(path)


def build(config, task, tokenizer=None):
    torch.manual_seed(0)
    return registry.task_spec(config, task).build(config, text_encoder=None, tokenizer=tokenizer)


# ---- targets and vocabulary ------------------------------------------------------------------------------------
def test_answer_scores():
    assert [answer_score(m) for m in range(0, 11)] == [0.0, 0.3, 0.6, 0.9] + [1.0] * 7


def test_vqa_targets_from_the_shared_batch(tokenizer):
    targets_of = VQATargets(ANSWERS, tokenizer)
    batch = VQACollator(tokenizer)([
        vqa_item(['blue'] * 3 + ['navy'] * 2 + ['purple'] + ['teal'] * 4),   # 3 / 2 / 1 annotators, one unknown
        vqa_item('yes', dataset='vg'),                                       # Visual Genome: dropped (spec 13.2)
        vqa_item(['teal'] * 10),                                             # no in-vocabulary answer: dropped
        vqa_item(['Blue'] * 2 + ['blue'] * 2 + ['dark green'] * 6),          # spellings of one label summed: 4
        vqa_item(['yes'] * 10),
    ])
    targets, keep = targets_of(batch[2], batch[3], batch[4])
    assert keep.tolist() == [True, False, False, True, True]
    expected = torch.zeros(5, len(ANSWERS))
    expected[0, 2], expected[0, 3], expected[0, 4] = 0.9, 0.6, 0.3
    expected[3, 2], expected[3, 5] = 1.0, 1.0
    expected[4, 0] = 1.0
    assert torch.allclose(targets, expected)


def test_the_worked_example_of_the_spec(tokenizer):
    """VLMo.md §17.2 item 13: answers {"2" x4, "two" x3, "3" x3}, vocabulary {"2", "3"} -> {2: 1.0, 3: 0.9}."""
    targets_of = VQATargets(['2', '3'], tokenizer)
    batch = VQACollator(tokenizer)([vqa_item(['2'] * 4 + ['two'] * 3 + ['3'] * 3)])
    targets, keep = targets_of(batch[2], batch[3], batch[4])
    assert keep.tolist() == [True] and torch.allclose(targets, torch.tensor([[1.0, 0.9]]))


def test_vocabulary_size_mismatch_is_refused(tmp_path, tokenizer):
    path = write_answers(tmp_path)
    config = {'model': 'vlmo', 'answer_list': path, 'vqa_num_labels': 5}
    with pytest.raises(ValueError, match=r"vqa_num_labels = 5 .*answer_list\.json.*answer_list\) has 6 answers"):
        make_vqa_step(config, torch.device('cpu'))
    with pytest.raises(ValueError, match='vqa_num_labels'):
        check_vocabulary({'answer_list': path}, ANSWERS)  # the default 3,129 labels
    check_vocabulary({**config, 'vqa_num_labels': 6}, ANSWERS)


# ---- training steps --------------------------------------------------------------------------------------------
def grads(model, *names):
    params = dict(model.named_parameters())
    return [params[n].grad is not None and float(params[n].grad.abs().sum()) > 0 for n in names]


def test_vqa_step_reaches_classifier_and_backbone(tmp_path, tokenizer):
    config = world_config('VQA', '.', answer_list=write_answers(tmp_path), vqa_num_labels=len(ANSWERS))
    model = build(config, 'vqa', tokenizer).train()
    step = registry.task_spec(config, 'vqa').make_step(config, torch.device('cpu'))
    batch = VQACollator(tokenizer)([vqa_item(['blue'] * 6 + ['navy'] * 4), vqa_item('no', dataset='vg'),
                                    vqa_item(['yes'] * 9 + ['no'])])
    torch.manual_seed(0)
    batch = (torch.randn(3, 3, 48, 48),) + batch[1:]
    loss = step(model, batch, 0.0)['loss']
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert grads(model, 'vqa_classifier.3.weight', 'vqa_classifier.0.weight', 'transformer.blocks.0.attn.qkv.weight',
                 'text_embeddings.word_embeddings.weight', 'transformer.blocks.3.mlp_vl.fc1.weight') == [True] * 5
    # a batch without a question to learn from gives a zero loss that still runs (and syncs) the whole model
    only_vg = VQACollator(tokenizer)([vqa_item('no', dataset='vg'), vqa_item(['teal'] * 10)])
    zero = step(model, (torch.randn(2, 3, 48, 48),) + only_vg[1:], 0.0)['loss']
    assert zero.item() == 0.0 and zero.requires_grad


def test_nlvr_step_uses_both_modality_rows(tokenizer):
    import NLVR
    from engine.tasks import classification_step
    config = world_config('NLVR', '.')
    model = build(config, 'nlvr').train()
    assert registry.task_spec(config, 'nlvr').make_step is None  # the model's forward has ALBEF's call signature
    items = [(torch.randn(3, 48, 48), torch.randn(3, 48, 48), 'the left image has a red star', 1),
             (torch.randn(3, 48, 48), torch.randn(3, 48, 48), 'there are two circles', 0)]
    batch = build_collate_fn('nlvr', tokenizer)(items)
    loss = classification_step(NLVR.pair_batch)(model, batch, 0.0)['loss']
    assert torch.isfinite(loss)
    loss.backward()
    assert grads(model, 'nlvr2_classifier.3.weight', 'transformer.blocks.0.attn.qkv.weight') == [True, True]
    assert (model.token_type_embeddings.weight.grad.abs().sum(1) > 0).tolist() == [True, True, True]
    image, text, label = NLVR.pair_batch(batch)
    with torch.no_grad():
        logits = model.eval()(image, text, label, train=False)
        direct = model.compute_nlvr2(batch[0], batch[1], *model.fixed_length(batch[2]), label)['nlvr2_logits']
    assert logits.shape == (2, 2) and torch.equal(logits, direct)


# ---- prediction ------------------------------------------------------------------------------------------------
def test_evaluate_hook_answers_every_question_once(world, tokenizer):
    config = world_config('VQA', world)
    spec = registry.task_spec(config, 'vqa')
    assert spec.evaluate is evaluate_vqa and registry.task_spec({}, 'vqa').evaluate is None  # ALBEF keeps its own
    test = create_dataset('vqa', config).test
    loader = torch.utils.data.DataLoader(test, batch_size=16, collate_fn=build_collate_fn('vqa', tokenizer, False))
    model = build(config, 'vqa', tokenizer)
    results = spec.evaluate(model, loader, tokenizer, torch.device('cpu'), config)
    assert sorted(r['question_id'] for r in results) == sorted(int(a['question_id']) for a in test.ann)
    assert all(r['answer'] in test.answer_list for r in results)
    with pytest.raises(ValueError, match='vqa_num_labels'):
        spec.evaluate(model, loader, tokenizer, torch.device('cpu'), {**config, 'vqa_num_labels': 7})


# ---- checkpoints -----------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def stage3_checkpoint(tmp_path_factory):
    """A tiny VLMoPretrain (configs/vlmo/Pretrain_synthetic.yaml's model) saved as Pretrain.py saves it."""
    config = load_config(os.path.join(CONFIGS, 'Pretrain_synthetic.yaml'))
    model = build(config, 'pretrain')
    with torch.no_grad():
        model.token_type_embeddings.weight.copy_(torch.arange(2.)[:, None].expand(2, 64))
    path = str(tmp_path_factory.mktemp('vlmo_s3') / 'checkpoint_last.pth')
    torch.save({'model': model.state_dict(), 'epoch': 1}, path)
    return path, model.state_dict()


@pytest.mark.parametrize('task', ['vqa', 'nlvr'])
def test_stage3_checkpoint_loads_with_the_heads_missing(task, stage3_checkpoint, world):
    path, saved = stage3_checkpoint
    config = world_config(task.upper(), world)
    spec = registry.task_spec(config, task)
    model = build(config, task)
    missing, unexpected = spec.load_checkpoint(model, path, config)
    head = 'vqa_classifier.' if task == 'vqa' else 'nlvr2_classifier.'
    assert missing and all(k.startswith(head) for k in missing)
    assert sorted(missing) == sorted(k for k in model.state_dict() if k.startswith(head))
    assert not any(k.startswith(head) for k in unexpected)
    tt = model.token_type_embeddings.weight.detach()
    assert tt.shape[0] == (3 if task == 'nlvr' else 2)
    assert torch.equal(tt[:2], saved['token_type_embeddings.weight'])
    if task == 'nlvr':
        assert torch.equal(tt[2], tt[1])  # rows [r0, r1, r1] (spec 7.3)
    block = 'transformer.blocks.1.attn.qkv.weight'
    assert torch.equal(model.state_dict()[block], saved[block])


# ---- image normalisation ---------------------------------------------------------------------------------------
def test_image_norm_switch_leaves_albef_on_clip(world):
    from PIL import Image
    grey = Image.new('RGB', (48, 48), (128, 128, 128))
    half = build_transform('test', 48, normalisation=NORMALIZATIONS['half'])(grey)
    assert torch.allclose(half, torch.full_like(half, (128 / 255 - 0.5) / 0.5), atol=1e-6)
    assert torch.equal(build_transform('test', 48)(grey), build_transform('test', 48, normalisation=NORMALIZATIONS['clip'])(grey))
    albef = load_config(os.path.join(REPO, 'configs', 'NLVR_synthetic.yaml'))
    assert albef.get('image_norm') is None
    vlmo = world_config('NLVR', world)
    assert vlmo['image_norm'] == 'half'
    image = create_dataset('nlvr', vlmo).val[0][0]
    assert torch.equal(create_dataset('nlvr', {**vlmo, 'image_norm': None}).val[0][0], image)  # vlmo: half by default
    clip = create_dataset('nlvr', {**vlmo, 'image_norm': 'clip'}).val[0][0]
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    assert torch.allclose(image * 0.5 + 0.5, clip * std[:, None, None] + mean[:, None, None], atol=1e-5)


# ---- the scripts end to end ------------------------------------------------------------------------------------
def run(script, config, out, root, checkpoint=None, evaluate=False, **keys):
    argv = ['--config', os.path.join(CONFIGS, config), '--output_dir', str(out), '--device', 'cpu']
    if checkpoint:
        argv += ['--checkpoint', checkpoint]
    if evaluate:
        argv += ['--evaluate']
    argv += opts(max_steps_per_epoch=3, num_workers=0, log_every=1, **{'schedule.epochs': 1}, **keys)
    proc = run_forked(script, argv, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(out, 'metrics.json')) as f:
        return json.load(f), proc.stdout


@pytest.mark.e2e
def test_vqa_script_end_to_end(world, tmp_path):
    with open(world / 'answer_list.json') as f:
        labels = len(json.load(f))
    data = dict(train_file=f'[{world}/vqa_train.json]', test_file=f'[{world}/vqa_test.json]',
                answer_list=f'{world}/answer_list.json', vqa_root=str(world), vg_root=str(world),
                vqa_num_labels=labels)
    metrics, _ = run('VQA.py', 'VQA_synthetic.yaml', tmp_path, world, **data)
    assert metrics['model'] == 'vlmo' and metrics['task'] == 'vqa'
    with open(world / 'vqa_test.json') as f:
        questions = json.load(f)
    assert metrics['metrics']['test_vqa_scored'] == len(questions)
    assert 0.0 <= metrics['metrics']['test_vqa_acc'] <= 100.0
    with open(metrics['result_file']) as f:
        results = json.load(f)
    assert sorted(r['question_id'] for r in results) == sorted(q['question_id'] for q in questions)
    steps = [json.loads(line) for line in open(tmp_path / 'train_steps.jsonl')]
    assert len(steps) == 3 and all(s['loss'] == s['loss'] and s['loss'] > 0 for s in steps)
    # --evaluate from the run's own checkpoint gives the same answers
    again, out = run('VQA.py', 'VQA_synthetic.yaml', tmp_path / 'eval', world, evaluate=True,
                     checkpoint=str(tmp_path / 'checkpoint_last.pth'), **data)
    assert '0 missing keys' in out and again['evaluate_only']
    with open(again['result_file']) as f:
        assert json.load(f) == results


@pytest.mark.e2e
def test_nlvr_script_end_to_end_from_a_stage3_checkpoint(world, tmp_path, stage3_checkpoint):
    metrics, out = run('NLVR.py', 'NLVR_synthetic.yaml', tmp_path, world, checkpoint=stage3_checkpoint[0],
                       train_file=f'[{world}/nlvr_train.json]', val_file=f'[{world}/nlvr_dev.json]',
                       test_file=f'[{world}/nlvr_test.json]', image_root=str(world))
    assert 'missing keys' in out and 'nlvr2_classifier' in out
    assert metrics['model'] == 'vlmo' and metrics['selected_by'] == 'val_acc'
    with open(world / 'nlvr_dev.json') as f:
        assert metrics['metrics']['val_n'] == len(json.load(f))
    assert 0.0 <= metrics['metrics']['test_acc'] <= 1.0
