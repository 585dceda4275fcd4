"""CODIS (a reconstruction, docs/README_codis.md): the Sinkhorn assignment, the code losses, the in-modal contrast and
the queue slice as pure functions; the full-size state-dict layout; the variant reducing to ALBEF bit for bit; the
family's registration and the dropped codebook keys downstream; the step's monitoring values."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import engine.config as engine_config
from models import losses, registry
from models.codis import CODIS
from models.model_pretrain import ALBEF
from tests.parity_utils import StubTokenizer, load_reference, model_config, text_input

REF = load_reference('pretrain')


def unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


# ---- Sinkhorn-Knopp (CODIS D-5) -------------------------------------------------------------------------------
def test_sinkhorn_rows_sum_to_one_and_clusters_equipartition():
    scores = unit(64, 8, 0) @ unit(16, 8, 1).t()
    codes = losses.sinkhorn(scores, eps=0.05, iters=3)
    assert codes.shape == (64, 16) and codes.dtype == torch.float32
    assert torch.allclose(codes.sum(1), torch.ones(64), atol=1e-5)
    converged = losses.sinkhorn(scores, eps=0.05, iters=50)
    assert torch.allclose(converged.sum(0), torch.full((16,), 64 / 16), rtol=0.01)
    assert torch.allclose(converged.sum(1), torch.ones(64), atol=1e-5)


def test_sinkhorn_equal_scores_permutations_small_eps_softmax_and_determinism():
    assert torch.allclose(losses.sinkhorn(torch.full((10, 4), 0.3), 0.05, 3), torch.full((10, 4), 0.25), atol=1e-7)
    scores = unit(32, 8, 2) @ unit(12, 8, 3).t()
    codes = losses.sinkhorn(scores, 0.05, 3)
    rows, cols = torch.randperm(32), torch.randperm(12)
    assert torch.allclose(losses.sinkhorn(scores[rows][:, cols], 0.05, 3), codes[rows][:, cols], atol=1e-6)
    tiny_eps = losses.sinkhorn(scores, 0.01, 3)
    assert torch.isfinite(tiny_eps).all() and torch.allclose(tiny_eps.sum(1), torch.ones(32), atol=1e-5)
    assert torch.allclose(losses.sinkhorn(scores, 0.05, 0), F.softmax(scores / 0.05, dim=1))
    assert torch.equal(losses.sinkhorn(scores, 0.05, 3), codes)
    assert not losses.sinkhorn(scores.requires_grad_(), 0.05, 3).requires_grad


def test_sinkhorn_is_the_swav_iteration():
    scores, eps, iters = unit(20, 6, 4) @ unit(5, 6, 5).t(), 0.1, 3
    p = torch.exp(scores.double() / eps).t()
    p /= p.sum()
    k, n = p.shape
    for _ in range(iters):
        p /= p.sum(1, keepdim=True) * k
        p /= p.sum(0, keepdim=True) * n
    assert torch.allclose(losses.sinkhorn(scores, eps, iters).double(), (p * n).t(), atol=1e-6)


# ---- the code-level losses (CODIS D-4) --------------------------------------------------------------------------
Q_IMAGE = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
Q_TEXT = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
L_IMAGE = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
L_TEXT = torch.tensor([[0.0, 1.0, 0.0], [2.0, -1.0, 0.0]])


def hand_cross_entropy(q, logits):
    total = 0.0
    for b in range(2):
        norm = math.log(sum(math.exp(v) for v in logits[b].tolist()))
        total += -sum(q[b][k].item() * (logits[b][k].item() - norm) for k in range(3))
    return total / 2


def test_swapped_code_loss_on_a_hand_computed_two_by_three_example():
    expected = (hand_cross_entropy(Q_TEXT, L_IMAGE) + hand_cross_entropy(Q_IMAGE, L_TEXT)) / 2
    assert losses.code_swap_loss(Q_IMAGE, Q_TEXT, L_IMAGE, L_TEXT).item() == pytest.approx(expected, abs=1e-6)
    intra = (hand_cross_entropy(Q_IMAGE, L_IMAGE) + hand_cross_entropy(Q_TEXT, L_TEXT)) / 2
    assert losses.code_intra_loss(Q_IMAGE, Q_TEXT, L_IMAGE, L_TEXT).item() == pytest.approx(intra, abs=1e-6)


def test_who_teaches_whom_the_image_student_learns_from_the_text_teacher():
    other = torch.tensor([[0.1, 0.1, 0.8], [0.9, 0.05, 0.05]])
    li, lt = L_IMAGE.clone().requires_grad_(), L_TEXT.clone().requires_grad_()
    q_image, q_text = Q_IMAGE.clone().requires_grad_(), Q_TEXT.clone().requires_grad_()
    losses.code_swap_loss(q_image, q_text, li, lt).backward()
    assert q_image.grad is None and q_text.grad is None  # teacher codes are constants
    grad_image, grad_text = li.grad.clone(), lt.grad.clone()
    li.grad = lt.grad = None
    losses.code_swap_loss(other, Q_TEXT, li, lt).backward()  # a new image teacher: only the text student moves
    assert torch.equal(li.grad, grad_image) and not torch.allclose(lt.grad, grad_text)
    # the image student's gradient is (p_image - q_text) / 2B
    assert torch.allclose(grad_image, (F.softmax(L_IMAGE, 1) - Q_TEXT) / 4, atol=1e-6)


def test_assignment_contrast_loss_by_hand():
    logp_i, logp_t = F.log_softmax(L_IMAGE, 1), F.log_softmax(L_TEXT, 1)
    expected = 0.0
    for logp, q in ((logp_i, Q_TEXT), (logp_t, Q_IMAGE)):
        for b in range(2):
            s = [sum(q[j, k].item() * logp[b, k].item() for k in range(3)) for j in range(2)]
            expected += -(s[b] - math.log(sum(math.exp(v) for v in s))) / 4
    assert losses.assignment_contrast_loss(Q_IMAGE, Q_TEXT, L_IMAGE, L_TEXT).item() == pytest.approx(expected,
                                                                                                    abs=1e-6)
    # a local batch of one (row 1 of the global batch, offset 1) contrasts against every global teacher row
    half = losses.assignment_contrast_loss(Q_IMAGE, Q_TEXT, L_IMAGE[1:], L_TEXT[1:], offset=1)
    s_i = logp_i[1] @ Q_TEXT.t()
    s_t = logp_t[1] @ Q_IMAGE.t()
    by_hand = -(F.log_softmax(s_i, 0)[1] + F.log_softmax(s_t, 0)[1]) / 2
    assert half.item() == pytest.approx(by_hand.item(), abs=1e-6)


def test_code_distillation_targets_are_the_teacher_codes_of_the_other_modality():
    """Swapped prediction against Sinkhorn targets is minimised, over the student, by the other modality's codes."""
    codes_text = losses.sinkhorn(unit(6, 4, 7) @ unit(3, 4, 8).t(), 0.05, 3)
    logits = torch.zeros(6, 3, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=5.0)
    for _ in range(300):
        opt.zero_grad()
        losses.code_swap_loss(codes_text, codes_text, logits, logits.detach()).backward()
        opt.step()
    assert torch.allclose(F.softmax(logits, 1), codes_text, atol=2e-2)


def test_intra_contrast_is_cross_entropy_on_the_batch_diagonal():
    f, f_m, queue, temp = unit(4, 8, 9), unit(4, 8, 10), unit(6, 8, 11).t(), 0.07
    sim = f @ torch.cat([f_m.t(), queue], 1) / temp
    assert losses.intra_contrast(f, f_m, queue, temp).item() == pytest.approx(
        F.cross_entropy(sim, torch.arange(4)).item(), abs=1e-5)
    soft = 0.4 * F.softmax(f_m @ torch.cat([f_m.t(), queue], 1) / temp, 1) + 0.6 * losses.identity_targets(sim)
    assert losses.intra_contrast(f, f_m, queue, temp, alpha=0.4, distill=True).item() == pytest.approx(
        losses.soft_cross_entropy(sim, soft).item(), abs=1e-5)


def test_recent_queue_columns_wrap_around_before_the_pointer():
    queue = torch.arange(10).float().view(1, 10).repeat(2, 1)  # column j holds j
    assert losses.recent_queue_columns(queue, 3, 5)[:, 0].tolist() == [8, 9, 0, 1, 2]
    assert losses.recent_queue_columns(queue, 7, 3)[:, 0].tolist() == [4, 5, 6]
    assert losses.recent_queue_columns(queue, 0, 0).shape == (0, 2)


def test_perplexity_and_agreement_statistics():
    assert losses.code_perplexity(torch.full((5, 8), 1 / 8)).item() == pytest.approx(8.0)
    assert losses.code_perplexity(F.one_hot(torch.zeros(5, dtype=torch.long), 8).float()).item() == pytest.approx(1.0)
    assert losses.code_agreement(L_IMAGE, torch.tensor([[3.0, 0, 0], [0, 0, 1.0]])).item() == 1.0
    assert losses.agreement_by_chance(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]), 3) == pytest.approx(0.5)


# ---- the model --------------------------------------------------------------------------------------------------
def tiny_config(**codis):
    cfg = model_config(REF['config'])
    cfg['model'] = 'codis'
    cfg['codis'] = {'codebook_size': 8, **codis}
    return cfg


def tiny_models(**codis):
    """ALBEF's and CODIS's toy pretraining models with the official reference weights (CODIS adds its codebook)."""
    albef = ALBEF(config=model_config(REF['config']), text_encoder=None, tokenizer=StubTokenizer(), init_deit=False)
    albef.load_state_dict(REF['state_dict'], strict=True)
    model = CODIS(config=tiny_config(**codis), text_encoder=None, tokenizer=StubTokenizer(), init_deit=False)
    missing, unexpected = model.load_state_dict(REF['state_dict'], strict=False)
    assert missing == ['codebook.weight'] and unexpected == []
    return albef, model


def forward(model, seed=0):
    inp = REF['inputs']
    torch.manual_seed(seed)
    return model(inp['image'], text_input(inp['input_ids'], inp['attention_mask']), alpha=0.4)


def test_full_size_layout_is_albef_plus_the_codebook():
    config = engine_config.load_config('configs/codis/Pretrain.yaml')
    with torch.device('meta'):
        model = CODIS(config=config, text_encoder=None, tokenizer=StubTokenizer(), init_deit=False)
        albef = ALBEF(config=config, text_encoder=None, tokenizer=StubTokenizer(), init_deit=False)
    keys, albef_keys = list(model.state_dict()), list(albef.state_dict())
    assert len(keys) == 845 and len(albef_keys) == 844
    assert model.state_dict()['codebook.weight'].shape == (4096, 256)
    assert [k for k in keys if k != 'codebook.weight'] == albef_keys
    assert keys.index('codebook.weight') == keys.index('itm_head.bias') + 1  # the model's own modules, then momentum
    online = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert online == 210_986_301 and sum(p.numel() for p in model.parameters()) == 420_922_487


def test_momentum_codebook_option_adds_its_ema_copy():
    model = CODIS(config=tiny_config(codebook_momentum=True), text_encoder=None, tokenizer=StubTokenizer(),
                  init_deit=False)
    sd = model.state_dict()
    assert 'codebook_m.weight' in sd and torch.equal(sd['codebook_m.weight'], sd['codebook.weight'])
    assert not model.codebook_m.weight.requires_grad


def test_without_codebook_terms_codis_is_albef_bit_for_bit():
    albef, model = tiny_models(weight_itc=1.0, weight_intra=0.0, weight_code=0.0)
    albef.train()
    model.train()
    loss_mlm, loss_ita, loss_itm = forward(albef)
    out = forward(model)
    assert torch.equal(out['loss_mlm'], loss_mlm) and torch.equal(out['loss_ita'], loss_ita)
    assert torch.equal(out['loss_itm'], loss_itm)
    assert not any(k.startswith('loss') for k in set(out) - {'loss_mlm', 'loss_ita', 'loss_itm'})
    (loss_mlm + loss_ita + loss_itm).backward()
    sum(v for k, v in out.items() if k.startswith('loss')).backward()
    ours = dict(model.named_parameters())
    for name, param in albef.named_parameters():
        if param.grad is not None:
            assert torch.equal(param.grad, ours[name].grad), name
    assert ours['codebook.weight'].grad is None
    for name, buf in albef.named_buffers():
        assert torch.equal(buf, dict(model.named_buffers())[name]), name


def test_step_returns_every_loss_and_the_codebook_monitoring_values():
    _, model = tiny_models()
    model.train()
    out = forward(model)
    assert {'loss_mlm', 'loss_ita', 'loss_itm', 'loss_intra', 'loss_code', 'code_perplexity_image',
            'code_perplexity_text', 'codes_used_image', 'codes_used_text', 'code_agreement',
            'code_teacher_entropy'} <= set(out)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert 1.0 <= out['code_perplexity_image'].item() <= 8.0 and 1 <= out['codes_used_text'].item() <= 8
    sum(v for k, v in out.items() if k.startswith('loss')).backward()
    assert model.codebook.weight.grad is not None and model.codebook.weight.grad.abs().sum() > 0
    assert model.code_prob_count.item() == 4
    model.train()  # a new epoch: the usage statistics start again
    assert model.code_prob_count.item() == 0 and not model.code_seen.any()


def test_code_loss_reads_the_queue_before_the_enqueue_and_freezing_stops_codebook_gradient(monkeypatch):
    _, model = tiny_models(sinkhorn_queue_samples=5, codebook_freeze_iters=1)
    model.train()
    model.queue_ptr[0] = 3
    queue_before = model.image_queue.clone()
    seen = []
    real = losses.codebook_scores

    def spy(features, codebook, temp=1.0):
        seen.append(features.detach().clone())
        return real(features, codebook, temp)

    monkeypatch.setattr(losses, 'codebook_scores', spy)
    out = forward(model)
    teacher_image = seen[2]  # student image, student text, then the teacher samples of each modality
    expected_tail = queue_before[:, [14, 15, 0, 1, 2]].t()
    assert teacher_image.shape == (4 + 5, 32) and torch.equal(teacher_image[4:], expected_tail)
    sum(v for k, v in out.items() if k.startswith('loss')).backward()
    assert model.codebook.weight.grad is None  # frozen in step 0
    model.zero_grad()
    out = forward(model, seed=1)  # step 1: unfrozen
    sum(v for k, v in out.items() if k.startswith('loss')).backward()
    assert model.codebook.weight.grad is not None


def test_each_rank_takes_its_rows_of_the_teacher_codes_of_the_global_batch(monkeypatch):
    """Two processes of 4 samples: the Sinkhorn problem is the one process's problem on the concatenated 8 samples, and
    rank r's loss reads rows 4r..4r+3 of its codes."""
    import models.codis as codis_module
    _, model = tiny_models(sinkhorn_queue_samples=6)
    model.queue_ptr[0] = 5
    image, text = unit(8, 32, 21), unit(8, 32, 22)
    one_process = model.teacher_codes(image, text)
    assert one_process[2] == 0
    local_image, local_text = image[4:], text[4:]
    gathered = {id(local_image): image, id(local_text): text}
    monkeypatch.setattr(codis_module, 'concat_all_gather', lambda x: gathered[id(x)])
    monkeypatch.setattr(codis_module, '_rank', lambda: 1)
    q_image, q_text, offset = model.teacher_codes(local_image, local_text)
    assert offset == 4
    assert torch.equal(q_image, one_process[0]) and torch.equal(q_text, one_process[1])
    assert q_image.shape == (8, 8)


def test_forward_is_deterministic_for_a_seed():
    _, first = tiny_models()
    second = copy.deepcopy(first)
    a, b = forward(first.train()), forward(second.train())
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_held_out_metrics_compare_agreement_with_chance():
    _, model = tiny_models()
    images, texts = unit(3, 32, 12), unit(6, 32, 13)
    metrics = model.eval().evaluation_metrics(images, texts, {i: i // 2 for i in range(6)})
    assert 0.0 <= metrics['heldout_code_agreement'] <= 1.0
    assert metrics['heldout_code_agreement_uniform'] == 1 / 8 and 0 < metrics['heldout_code_agreement_chance'] <= 1
    same = model.evaluation_metrics(images, images[[0, 0, 1, 1, 2, 2]], {i: i // 2 for i in range(6)})
    assert same['heldout_code_agreement'] == 1.0


# ---- registration and downstream ------------------------------------------------------------------------------
def test_codis_family_pretrains_with_codis_and_fine_tunes_albef_task_models():
    assert registry.task_spec({'model': 'codis'}, 'pretrain').model_class is CODIS
    for task in registry.TASKS:
        if task != 'pretrain':
            assert registry.task_spec({'model': 'codis'}, task).model_class is \
                registry.task_spec({'model': 'albef'}, task).model_class


def test_downstream_rules_drop_and_report_the_codebook(tmp_path, capsys):
    import models.model_retrieval
    _, model = tiny_models()
    path = tmp_path / 'codis.pth'
    torch.save({'model': model.state_dict()}, path)
    cfg = model_config(REF['config'])
    cfg.update(model='codis', k_test=2, reset_queues_on_finetune=False)
    retrieval = models.model_retrieval.ALBEF(config=cfg, text_encoder=None, tokenizer=StubTokenizer())
    missing, unexpected, _ = registry.task_spec(cfg, 'retrieval').load_checkpoint(retrieval, str(path), cfg)
    assert 'dropped CODIS-only keys: codebook.weight' in capsys.readouterr().out
    assert not any(k.startswith('codebook') for k in unexpected)
    assert torch.equal(retrieval.vision_proj.weight, model.vision_proj.weight)
    resumed = CODIS(config=tiny_config(), text_encoder=None, tokenizer=StubTokenizer(), init_deit=False)
    registry.task_spec({'model': 'codis'}, 'pretrain').load_checkpoint(resumed, str(path), {})
    assert torch.equal(resumed.codebook.weight, model.codebook.weight)


def test_pretrain_step_accepts_albef_tuples_and_codis_dicts():
    from Pretrain import step_outputs
    one = torch.tensor(1.0)
    assert list(step_outputs((one, one * 2, one * 3))) == ['loss_mlm', 'loss_ita', 'loss_itm']
    assert step_outputs({'loss_code': one, 'code_agreement': one}) == {'loss_code': one, 'code_agreement': one}


def test_codebook_scores_and_in_modal_similarities_stay_fp32_under_bf16_autocast():
    f, c = unit(4, 8, 14), unit(6, 8, 15)
    with torch.autocast(device_type='cpu', dtype=torch.bfloat16):
        scores = losses.codebook_scores(f, c, 0.1)
        intra = losses.intra_contrast(f, f, c.t(), 0.07)
    assert scores.dtype == torch.float32 and torch.equal(scores, losses.codebook_scores(f, c, 0.1))
    assert intra.item() == losses.intra_contrast(f, f, c.t(), 0.07).item()
