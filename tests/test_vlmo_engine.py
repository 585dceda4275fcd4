"""VLMo's training-loop needs in the shared engine (issue #15 item 5; VLMo spec sections 5.6, 10.3, 12.1, 12.2): the
per-optimizer-step schedule, gradient accumulation to batch_size_global, the four VLMo parameter groups (full-size
counts on the meta device) found by fit through the registry, the transformers-4.8.1 AdamW update, an exact resume
of the step schedule, and the ALBEF loop unchanged (accumulation 1, epoch schedule)."""
import json
import math
import os
import types

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import engine
from engine.checkpoints import TrainingRun
from engine.config import ConfigError, load_config
from engine.loop import accumulation, total_loss, train_one_epoch
from models import registry
from optim import create_optimizer
from optim.adamw_hf import AdamWHF
from optim.vlmo import vlmo_param_groups
from scheduler import StepScheduler, create_scheduler, create_step_scheduler, schedule_steps, warmup_step
from tests.helpers import spawn

torch.set_num_threads(1)
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs', 'vlmo')


# ---- the update rule ----------------------------------------------------------------------------------------------
def test_adamw_hf_one_and_two_steps_by_hand():
    p = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    frozen = nn.Parameter(torch.tensor([3.0], dtype=torch.float64))  # never gets a gradient: untouched, no decay
    lr, wd, b1, b2, eps = 0.1, 0.5, 0.9, 0.98, 1e-8
    opt = AdamWHF([{'params': [p, frozen], 'weight_decay': wd}], lr=lr, betas=(b1, b2), eps=eps)
    g1, g2 = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([-0.25, 2.0], dtype=torch.float64)
    expected, m, v = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.0, 0.0
    for t, g in enumerate((g1, g2), start=1):
        p.grad = g.clone()
        opt.step()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        expected = expected - lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (v.sqrt() + eps)
        expected = expected - lr * wd * expected  # decoupled decay after the step, on the updated p
        assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-15)
    assert frozen.item() == 3.0 and frozen not in opt.state
    # one step of torch's AdamW differs (decay first, eps after the bias correction)
    q = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    torch_opt = torch.optim.AdamW([q], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    q.grad = g1.clone()
    torch_opt.step()
    p1 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    m1, v1 = (1 - b1) * g1, (1 - b2) * g1 * g1
    hf_first = p1 - lr * math.sqrt(1 - b2) / (1 - b1) * m1 / (v1.sqrt() + eps)
    assert not torch.equal(q.detach(), hf_first - lr * wd * hf_first)


def test_optimizer_selection_by_config():
    model = nn.Linear(2, 2)
    hf = create_optimizer({'opt': 'adamw_hf', 'lr': 1e-4, 'weight_decay': 0.01, 'betas': [0.9, 0.98], 'eps': 1e-8},
                          model)
    assert isinstance(hf, AdamWHF) and all(g['betas'] == (0.9, 0.98) and g['eps'] == 1e-8 and g['correct_bias']
                                           for g in hf.param_groups)
    tt = create_optimizer({'opt': 'adamw_torch', 'lr': 1e-4, 'betas': [0.9, 0.98]}, model)
    assert type(tt) is torch.optim.AdamW and tt.param_groups[0]['betas'] == (0.9, 0.98)
    albef = create_optimizer({'opt': 'adamW', 'lr': 1e-4}, model)
    assert type(albef) is torch.optim.AdamW and albef.param_groups[0]['betas'] == (0.9, 0.999)
    with pytest.raises(ValueError, match='adamw_hf'):
        create_optimizer({'opt': 'adam', 'lr': 1e-4}, model)
    for name in ('Pretrain', 'Pretrain_stage2', 'Retrieval_coco', 'Retrieval_flickr', 'VQA', 'NLVR',
                 'Pretrain_synthetic', 'Pretrain_stage2_synthetic'):
        opt = load_config(os.path.join(CONFIGS, f'{name}.yaml'))['optimizer']
        assert (opt['opt'], opt['betas'], opt['eps'], opt['weight_decay']) == ('adamw_hf', [0.9, 0.98], 1e-8, 0.01)


# ---- the parameter groups -----------------------------------------------------------------------------------------
def _meta_model(name, task):
    config = load_config(os.path.join(CONFIGS, f'{name}.yaml'))
    with torch.device('meta'):
        model = registry.task_spec(config, task).build(config, text_encoder=None, tokenizer=None, init_deit=False)
    return config, model


def _counts(group):
    return len(group['params']), sum(p.numel() for p in group['params'])


def _names(model, group):
    ids = {id(p) for p in group['params']}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_full_size_groups_stage3():
    config, model = _meta_model('Pretrain', 'pretrain')
    groups = registry.optimizer_groups_for(config, model)
    assert [_counts(g) for g in groups] == [(142, 202080002), (150, 365468), (0, 0), (0, 0)]
    assert [(g['lr'], g['weight_decay']) for g in groups] == [(2e-4, 0.01), (2e-4, 0.0), (2e-4, 0.01), (2e-4, 0.0)]
    decay, no_decay = _names(model, groups[0]), _names(model, groups[1])
    assert {'relative_position_bias_table', 'transformer.blocks.0.attn.q_bias', 'transformer.blocks.0.attn.v_bias',
            'transformer.norm.weight', 'transformer.blocks.0.norm1.weight', 'text_embeddings.LayerNorm.weight',
            'mlm_score.transform.LayerNorm.weight'} <= no_decay
    assert {'transformer.blocks.0.norm2_text.weight', 'transformer.blocks.0.norm2_imag.weight',
            'transformer.blocks.11.norm2_vl.weight', 'transformer.blocks.0.gamma_1', 'transformer.cls_token',
            'logit_scale', 'logit_vl_scale', 'text_embeddings.word_embeddings.weight'} <= decay


def test_full_size_groups_vqa_with_the_head_multiplier():
    config, model = _meta_model('VQA', 'vqa')
    groups = registry.optimizer_groups_for(config, model)
    assert [_counts(g) for g in groups] == [(133, 175688448), (145, 728928), (3, 5987328), (3, 6201)]
    assert [(g['lr'], g['weight_decay']) for g in groups] == [(3e-5, 0.01), (3e-5, 0.0), (3e-5 * 20, 0.01),
                                                              (3e-5 * 20, 0.0)]
    assert 'vqa_classifier.1.weight' in _names(model, groups[2])  # the LayerNorm inside the Sequential: decayed
    optimizer = create_optimizer(config['optimizer'], model, groups=groups)
    assert isinstance(optimizer, AdamWHF)
    assert [g['lr'] for g in optimizer.param_groups] == [3e-5, 3e-5, 3e-5 * 20, 3e-5 * 20]  # lr x lr_mult, as official


def test_albef_and_frozen_parameters_keep_their_groups():
    albef = {'optimizer': {'opt': 'adamW', 'lr': 1e-4}}
    assert registry.optimizer_groups_for(albef, nn.Linear(2, 2)) is None  # the project's groups (optim.param_groups)
    model = nn.Module()
    model.nlvr2_classifier = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    model.frozen = nn.Linear(2, 2)
    model.frozen.requires_grad_(False)
    groups = vlmo_param_groups(model, {'optimizer': {'lr': 1.0, 'weight_decay': 0.1}, 'lr_mult_heads': 5})
    assert [len(g['params']) for g in groups] == [0, 0, 2, 2] and groups[2]['lr'] == 5.0


# ---- the schedule -------------------------------------------------------------------------------------------------
def test_step_scheduler_values_and_heads():
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD([{'params': [model.weight], 'lr': 2e-4}, {'params': [model.bias], 'lr': 4e-3}],
                                lr=2e-4)
    sched = StepScheduler(optimizer, 200000, 2500, 2e-4)
    assert sched.get_last_lr() == [0.0, 0.0]  # the first step uses lr 0
    sched.step()
    lrs = sched.get_last_lr()
    assert abs(lrs[0] - 8e-8) < 1e-15 and abs(lrs[1] - 1.6e-6) < 1e-14
    sched.optimizer_step = 99999
    sched.step()
    assert abs(optimizer.param_groups[0]['lr'] - 1.01266e-4) < 1e-9
    assert optimizer.param_groups[1]['lr'] == 20 * optimizer.param_groups[0]['lr']


def test_cosine_schedule_is_the_official_decay_power_cosine():
    """schedule.sched: cosine = transformers 4.8.1 get_cosine_schedule_with_warmup (num_cycles 0.5): the same
    linear warm-up from 0, then 0.5 (1 + cos(pi p)) with p the fraction of the decay done; end_lr is not read."""
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD([{'params': [model.weight], 'lr': 2e-4}, {'params': [model.bias], 'lr': 4e-3}],
                                lr=2e-4)
    config = {'optimizer': {'lr': 2e-4}, 'schedule': {'sched': 'cosine', 'max_steps': 200000, 'warmup_steps': 2500,
                                                      'end_lr': 1e-5}}
    sched, epochs = create_step_scheduler(config, optimizer, 1000, 1)
    assert epochs == 200 and sched.get_last_lr() == [0.0, 0.0]
    sched.step()
    assert abs(sched.get_last_lr()[0] - 8e-8) < 1e-15  # the warm-up is the linear schedule's
    seen = {}
    for s in (2500, 2500 + 197500 // 4, 101250, 200000):
        sched.optimizer_step = s - 1
        seen[s] = sched.step()
    assert seen[2500] == pytest.approx(2e-4, rel=1e-12)
    assert seen[2500 + 197500 // 4] == pytest.approx(1e-4 * (1 + math.cos(math.pi * 49375 / 197500)), rel=1e-9)
    assert seen[101250] == pytest.approx(1e-4, rel=1e-9)  # half-way through the decay: half the base lr
    assert seen[200000] == pytest.approx(0.0, abs=1e-18)  # to 0, whatever end_lr says
    assert optimizer.param_groups[1]['lr'] == pytest.approx(20 * optimizer.param_groups[0]['lr'], abs=1e-18)
    # the linear schedule at the same point is another value: the switch is read
    linear, _ = create_step_scheduler({**config, 'schedule': {**config['schedule'], 'sched': 'linear',
                                                              'end_lr': 0}},
                                      torch.optim.SGD(model.parameters(), lr=2e-4), 1000, 1)
    linear.optimizer_step = 2500 + 197500 // 4 - 1
    assert linear.step() == pytest.approx(1.5e-4, rel=1e-9)
    # resume: the kind travels with the state dict
    restored = StepScheduler(optimizer, 10, 0, 2e-4)
    restored.load_state_dict(sched.state_dict())
    assert restored.sched == 'cosine' and restored.factor(101250) == pytest.approx(0.5)
    with pytest.raises(ValueError, match='cosine'):
        schedule_steps({'sched': 'step', 'max_steps': 10}, 10, 1)


def test_schedule_steps():
    # max_steps with an int warm-up; the epochs it takes (capped by `epochs`, the official max_epoch)
    assert schedule_steps({'max_steps': 3000, 'warmup_steps': 300}, 1000, 2) == (3000, 300, 6)
    assert schedule_steps({'max_steps': 3000, 'warmup_steps': 300, 'epochs': 4}, 1000, 2) == (3000, 300, 4)
    # epoch-based fine-tuning: S = len(loader) * epochs // accumulation, warm-up a fraction of S
    assert schedule_steps({'max_steps': None, 'warmup_steps': 0.1, 'epochs': 10}, 1001, 4) == (2502, 250, 10)
    with pytest.raises(ValueError, match='epochs'):
        schedule_steps({'max_steps': None, 'warmup_steps': 0.1}, 10, 1)


def test_accumulation_count_and_refusals():
    assert accumulation({'batch_size': 32}, 8) == 1
    assert accumulation({'batch_size': 32, 'batch_size_global': 1024}, 8) == 4
    assert accumulation({'batch_size_train': 32, 'batch_size': 7, 'batch_size_global': 128}, 2) == 2
    with pytest.raises(ConfigError, match='positive multiple'):
        accumulation({'batch_size': 32, 'batch_size_global': 1000}, 8)
    with pytest.raises(ConfigError, match='positive multiple'):
        accumulation({'batch_size_train': 32, 'batch_size_global': 128}, 8)


# ---- the loop -----------------------------------------------------------------------------------------------------
class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x)


def toy_step(model, batch, alpha):
    x, y = batch
    return {'loss': ((model(x) - y) ** 2).mean()}  # through forward: DDP's hooks


def toy_loader(batch_size, n=16):
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def toy_args(out, resume=None):
    os.makedirs(out, exist_ok=True)
    return types.SimpleNamespace(output_dir=str(out), seed=0, resume=resume, checkpoint=None, device='cpu',
                                 distributed=False)


def step_config(**extra):
    config = {'optimizer': {'opt': 'adamw_hf', 'lr': 0.05, 'weight_decay': 0.01, 'betas': [0.9, 0.98], 'eps': 1e-8},
              'schedule': {'sched': 'linear', 'max_steps': None, 'warmup_steps': 0.25, 'end_lr': 0, 'power': 1,
                           'epochs': 2},
              'batch_size': 2, 'log_every': 1}
    config.update(extra)
    return config


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.startswith('{')]


def test_accumulation_equals_the_large_batch(tmp_path):
    big, small = Toy(), Toy()
    engine.fit(toy_args(tmp_path / 'big'), step_config(batch_size=4), big, toy_loader(4), toy_step)
    engine.fit(toy_args(tmp_path / 'acc'), step_config(batch_size=2, batch_size_global=4), small, toy_loader(2),
               toy_step)
    for a, b in zip(big.parameters(), small.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    big_log = read_jsonl(tmp_path / 'big' / 'train_steps.jsonl')
    acc_log = read_jsonl(tmp_path / 'acc' / 'train_steps.jsonl')
    # 2 epochs x 4 optimizer steps; S = 8, warm-up 2: the lr after each step; `step` is the micro-batch position
    assert [r['opt_step'] for r in big_log] == list(range(1, 9))
    assert [r['opt_step'] for r in acc_log] == [(i + 1) // 2 for i in range(16)]
    assert [r['lr'] for r in acc_log[1::2]] == [r['lr'] for r in big_log]
    assert [round(r['lr'], 9) for r in big_log] == [0.025, 0.05, 0.041666667, 0.033333333, 0.025, 0.016666667,
                                                    0.008333333, 0.0]
    assert [r['step'] for r in acc_log[:8]] == list(range(8))


def test_max_steps_stop_and_the_shorter_last_window(tmp_path):
    model = Toy()
    config = step_config(batch_size_global=4, schedule={'sched': 'linear', 'max_steps': 5, 'warmup_steps': 1,
                                                         'end_lr': 0, 'power': 1})
    result = engine.fit(toy_args(tmp_path / 'a'), config, model, toy_loader(2, n=14), toy_step)
    log = read_jsonl(tmp_path / 'a' / 'train_steps.jsonl')
    # 7 micro-batches per epoch = 4 optimizer steps (the last one on one micro-batch); 5 steps = 2 epochs, the second
    # stopping after its first optimizer step
    assert [r['epoch'] for r in result.records] == [0, 1]
    assert [(r['epoch'], r['step'], r['opt_step']) for r in log] == [
        (0, 0, 0), (0, 1, 1), (0, 2, 1), (0, 3, 2), (0, 4, 2), (0, 5, 3), (0, 6, 4), (1, 0, 4), (1, 1, 5)]


def test_fit_uses_the_family_groups(tmp_path):
    config = load_config(os.path.join(CONFIGS, 'Pretrain_synthetic.yaml'),
                         ['task=vqa', 'lr_mult_heads=20', 'batch_size=2', 'batch_size_global=4', 'schedule.epochs=1'])
    model = registry.task_spec(config, 'vqa').build(config, text_encoder=None, tokenizer=None, init_deit=False)

    def head_step(m, batch, alpha):
        x, _ = batch
        return {'loss': m.vqa_classifier(x.repeat(1, 22)[:, :64]).pow(2).mean()}

    engine.fit(toy_args(tmp_path / 'v'), config, model, toy_loader(2, n=8), head_step)
    ckpt = torch.load(tmp_path / 'v' / 'checkpoint_last.pth', weights_only=True)
    groups = ckpt['optimizer']['param_groups']
    assert len(groups) == 4 and [len(g['params']) for g in groups[2:]] == [3, 3]
    assert ckpt['lr_scheduler']['base_lrs'] == [1e-3, 1e-3, 2e-2, 2e-2] and ckpt['lr_scheduler']['optimizer_step'] == 2
    assert len(ckpt['optimizer']['state']) == 6  # only the head had gradients: the body parameters were skipped


class Interrupt(Exception):
    pass


def test_resume_continues_the_same_lr_sequence(tmp_path):
    config = step_config(batch_size_global=4, checkpoint_every_steps=1)
    engine.fit(toy_args(tmp_path / 'full'), config, Toy(), toy_loader(2), toy_step)
    calls = {'n': 0}

    def dying_step(model, batch, alpha):
        calls['n'] += 1
        if calls['n'] == 12:  # epoch 1, micro-batch 3: after the step checkpoint of epoch 1 micro-batch 2
            raise Interrupt
        return toy_step(model, batch, alpha)

    with pytest.raises(Interrupt):
        engine.fit(toy_args(tmp_path / 'cut'), config, Toy(), toy_loader(2), dying_step)
    assert (tmp_path / 'cut' / 'checkpoint_01_step000002.pth').exists()
    resumed = Toy()
    engine.fit(toy_args(tmp_path / 'cut', resume='auto'), config, resumed, toy_loader(2), toy_step)
    full, cut = (torch.load(tmp_path / d / 'checkpoint_last.pth', weights_only=True) for d in ('full', 'cut'))
    assert full['lr_scheduler'] == cut['lr_scheduler'] and full['lr_scheduler']['optimizer_step'] == 8
    for key, value in full['model'].items():
        assert torch.equal(value, cut['model'][key]), key

    def by_position(path):
        return {(r['epoch'], r['step']): (r['lr'], r['opt_step'], r['loss']) for r in read_jsonl(path)}
    assert by_position(tmp_path / 'cut' / 'train_steps.jsonl') == by_position(tmp_path / 'full' / 'train_steps.jsonl')


def test_fp16_trains_with_a_loss_scaler_that_checkpoints_and_resumes(tmp_path):
    """precision: fp16 (VLMo's official AMP): autocast to float16, losses scaled by torch's GradScaler (from 2^16),
    the update taken on unscaled gradients, an inf gradient skips the step and halves the scale, and the scaler's
    state travels with every checkpoint so a resumed run continues bit for bit."""
    def small_step(model, batch, alpha):  # x 1e-3: the gradients x 2^16 stay within float16 (AdamW ignores the scale)
        return {'loss': toy_step(model, batch, alpha)['loss'] * 1e-3}
    plain, half = Toy(), Toy()
    engine.fit(toy_args(tmp_path / 'fp32'), step_config(), plain, toy_loader(2), small_step)
    engine.fit(toy_args(tmp_path / 'fp16'), step_config(precision='fp16'), half, toy_loader(2), small_step)
    assert 'grad_scaler' not in torch.load(tmp_path / 'fp32' / 'checkpoint_last.pth', weights_only=True)
    scaler = torch.load(tmp_path / 'fp16' / 'checkpoint_last.pth', weights_only=True)['grad_scaler']
    assert scaler['scale'] == 2.0 ** 16 and scaler['_growth_tracker'] == 16  # 16 finite steps, none skipped
    for a, b, c in zip(plain.parameters(), half.parameters(), Toy().parameters()):
        # the same updates up to float16 rounding of the forward and backward
        assert not torch.equal(a, b) and torch.allclose(a, b, rtol=0, atol=0.02)
        assert (a - c).abs().max() > 0.1
    # a finite loss whose scaled gradient overflows float16: the step is skipped and the scale halves
    seen = []

    def overflowing_step(model, batch, alpha):
        out = toy_step(model, batch, alpha)
        seen.append(True)
        if len(seen) == 5:
            out['loss'] = out['loss'] * 1e30
        return out
    config = step_config(precision='fp16', checkpoint_every_steps=1, keep_step_checkpoints=100,
                         schedule={**step_config()['schedule'], 'epochs': 1})
    engine.fit(toy_args(tmp_path / 'inf'), config, Toy(), toy_loader(2), overflowing_step)
    before, after = (torch.load(tmp_path / 'inf' / f'checkpoint_00_step{n:06d}.pth', weights_only=True) for n in (4, 5))
    assert after['grad_scaler']['scale'] == before['grad_scaler']['scale'] / 2
    assert all(torch.equal(v, after['model'][k]) for k, v in before['model'].items())
    # resume mid-run: the same weights and scaler as the uninterrupted fp16 run
    config = step_config(precision='fp16', checkpoint_every_steps=1)
    engine.fit(toy_args(tmp_path / 'full'), config, Toy(), toy_loader(2), toy_step)
    calls = {'n': 0}

    def dying_step(model, batch, alpha):
        calls['n'] += 1
        if calls['n'] == 12:
            raise Interrupt
        return toy_step(model, batch, alpha)
    with pytest.raises(Interrupt):
        engine.fit(toy_args(tmp_path / 'cut'), config, Toy(), toy_loader(2), dying_step)
    engine.fit(toy_args(tmp_path / 'cut', resume='auto'), config, Toy(), toy_loader(2), toy_step)
    full, cut = (torch.load(tmp_path / d / 'checkpoint_last.pth', weights_only=True) for d in ('full', 'cut'))
    assert full['grad_scaler'] == cut['grad_scaler']
    for key, value in full['model'].items():
        assert torch.equal(value, cut['model'][key]), key


def test_config_refusals(tmp_path):
    with pytest.raises(ConfigError, match='needs the per-step `schedule`'):
        engine.fit(toy_args(tmp_path / 'a'), {**albef_config(), 'batch_size_global': 8}, Toy(), toy_loader(2),
                   toy_step)
    with pytest.raises(ConfigError, match='both `schedule`'):
        engine.fit(toy_args(tmp_path / 'b'), {**step_config(), 'schedular': albef_config()['schedular']}, Toy(),
                   toy_loader(2), toy_step)


# ---- ALBEF unchanged ----------------------------------------------------------------------------------------------
def albef_config():
    return {'optimizer': {'opt': 'adamW', 'lr': 1e-2, 'weight_decay': 0.02},
            'schedular': {'sched': 'cosine', 'lr': 1e-2, 'epochs': 3, 'min_lr': 1e-4, 'decay_rate': 1,
                          'warmup_lr': 1e-5, 'warmup_epochs': 2, 'cooldown_epochs': 0},
            'warmup_step_size': 2, 'batch_size': 2, 'log_every': 1}


def test_albef_epoch_loop_is_the_loop_before_accumulation(tmp_path):
    """The loop of the commit before accumulation (zero_grad, backward, step, staircase warm-up per iteration),
    written out here, and train_one_epoch give bit-identical parameters and learning rates on ALBEF's path."""
    config = albef_config()
    reference, model = Toy(), Toy()
    ref_opt = create_optimizer(config['optimizer'], reference)
    ref_sched = create_scheduler(config['schedular'], ref_opt)
    ref_lrs = []
    for i, batch in enumerate(toy_loader(2)):
        loss = total_loss(toy_step(reference, batch, 0.4))
        ref_opt.zero_grad(set_to_none=True)
        loss.backward()
        ref_opt.step()
        warmup_step(ref_sched, 0, i, 2, 2)
        ref_lrs.append(ref_opt.param_groups[0]['lr'])

    optimizer = create_optimizer(config['optimizer'], model)
    scheduler = create_scheduler(config['schedular'], optimizer)
    run = TrainingRun(toy_args(tmp_path), config, model, optimizer, scheduler)
    stats = train_one_epoch(model, toy_loader(2), optimizer, scheduler, toy_step, config=config,
                            device=torch.device('cpu'), epoch=0, ramp_alpha=False, run=run)
    for a, b in zip(reference.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert optimizer.state_dict()['state'][0]['step'] == ref_opt.state_dict()['state'][0]['step'] == 8
    assert stats['lr'] == sum(ref_lrs) / len(ref_lrs)


# ---- two gloo processes: accumulation under DDP (no_sync) = the single-process global batch ------------------------
def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist
    from torch.utils.data import DistributedSampler
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    loader = toy_loader(2)
    sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(loader.dataset, batch_size=2, sampler=sampler)
    args = toy_args(out)
    args.distributed = True
    model = Toy()
    engine.fit(args, step_config(batch_size=2, batch_size_global=8), model, loader, toy_step, train_sampler=sampler)
    torch.save({k: v.detach() for k, v in model.state_dict().items()}, os.path.join(out, f'rank{rank}.pt'))
    dist.destroy_process_group()


def test_accumulation_under_ddp_equals_the_global_batch(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    spawn(_ddp_worker, args=(2, port, str(tmp_path / 'ddp')), nprocs=2)
    single = Toy()
    engine.fit(toy_args(tmp_path / 'one'), step_config(batch_size=8), single, toy_loader(8), toy_step)
    ranks = [torch.load(tmp_path / 'ddp' / f'rank{r}.pt', weights_only=True) for r in range(2)]
    for key, value in single.state_dict().items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # the ranks stay identical
        assert torch.allclose(ranks[0][key], value, rtol=0, atol=1e-6), key
    log = read_jsonl(tmp_path / 'ddp' / 'train_steps.jsonl')
    assert [r['opt_step'] for r in log] == [0, 1, 1, 2, 2, 3, 3, 4]  # 2 epochs x 4 micro-batches per rank


def test_update_rule_and_schedules_equal_transformers_4_8_1():
    """VLMo.md 12.1 / 12.2 against tests/fixtures/vlmo_optim (made with transformers 4.8.1): AdamWHF bit for bit over
    six steps (two weight-decay groups, a parameter skipped when it has no gradient), and both schedules' factors."""
    from models.losses import vlmo_cosine_lr_factor, vlmo_lr_factor
    golden = torch.load(os.path.join(os.path.dirname(__file__), 'fixtures', 'vlmo_optim', 'golden.pt'),
                        weights_only=True)
    params = [nn.Parameter(p.clone()) for p in golden['init']]
    optimizer = AdamWHF([{'params': params[:2], 'weight_decay': 0.01}, {'params': params[2:], 'weight_decay': 0.0}],
                        lr=1e-3, betas=(0.9, 0.98), eps=1e-8)
    for step, grads in enumerate(golden['grads']):
        for p, g in zip(params, grads):
            p.grad = None if (step == 2 and p is params[2]) else g.clone()
        optimizer.step()
        for p, expected in zip(params, golden['after'][step]):
            assert torch.equal(p.detach(), expected), step
    steps = golden['schedules']['steps'].tolist()
    ours = {'linear': [vlmo_lr_factor(s, 200000, 2500) for s in steps],
            'poly_end': [vlmo_lr_factor(s, 1000, 100, 2.0, 1e-5 / 2e-4) for s in steps],
            'cosine': [vlmo_cosine_lr_factor(s, 200000, 2500) for s in steps]}
    for name, values in ours.items():
        assert torch.allclose(torch.tensor(values, dtype=torch.float64), golden['schedules'][name], rtol=0,
                              atol=1e-12), name
