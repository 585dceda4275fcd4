"""ALBEF objectives as pure functions of tensors (paper, sections 3 and 5).

Everything here keeps the official formulas and operation order. Similarities, softmaxes and cross-entropies
are computed in fp32 even under bf16 autocast.
"""
import math

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits, targets):
    """mean_b(-sum_j log_softmax(logits)_bj * targets_bj), in fp32."""
    return -torch.sum(F.log_softmax(logits.float(), dim=1) * targets, dim=1).mean()


def distill_targets(sim_m, hard_targets, alpha):
    """Momentum-distillation targets alpha * softmax(sim_m) + (1 - alpha) * hard_targets."""
    return alpha * F.softmax(sim_m.float(), dim=1) + (1 - alpha) * hard_targets


def distillation_off(alpha):
    """True when `alpha` is exactly the number 0: `(1 - alpha) * loss + alpha * distill` is then `loss` bit for bit
    (finite `distill`), so the soft-label term and the soft labels themselves need not be computed. The momentum
    passes that give them still run wherever they draw dropout masks, so a run's random stream is the same."""
    return isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha == 0


def identity_targets(sim):
    """One-hot ITC targets: identity on the first B columns, zero on the queue (pretraining)."""
    targets = torch.zeros(sim.size(), device=sim.device)
    targets.fill_diagonal_(1)
    return targets


def idx_targets(idx, idx_all):
    """Targets where every item with the same image id is a positive with an equal share (retrieval)."""
    pos = torch.eq(idx.view(-1, 1), idx_all).float()
    return pos / pos.sum(1, keepdim=True)


def itc_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i):
    """(loss_i2t + loss_t2i) / 2 with soft targets."""
    return (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2


def negative_weights(sim_local, idx=None, eps=0.0):
    """Hard-negative sampling weights softmax(sim[:, :B] + eps), with the diagonal (or same-idx pairs) zeroed."""
    weights = F.softmax(sim_local.float() + eps, dim=1)
    if idx is None:
        weights.fill_diagonal_(0)
    else:
        same = torch.eq(idx.view(-1, 1), idx.view(1, -1))
        weights.masked_fill_(same, 0)
    return weights


def sanitize_negative_weights(weights, idx=None):
    """Weights torch.multinomial accepts: non-finite -> 0; a row summing to 0 becomes uniform over valid negatives.

    Valid negatives are j != b with a different idx when such j exist, else all j != b. Returns the weights and
    the number of rows that needed the fallback. Healthy rows are returned unchanged.
    """
    B = weights.shape[0]
    if B < 2:
        raise ValueError('ITM hard negatives need a batch of at least 2 samples per process; '
                         'raise batch_size (and keep queue_size divisible by world_size * batch_size)')
    w = torch.nan_to_num(weights, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
    bad = w.sum(1) <= 0
    n_bad = int(bad.sum())
    if n_bad:
        not_self = ~torch.eye(B, dtype=torch.bool, device=w.device)
        fallback = not_self
        if idx is not None:
            different = not_self & torch.ne(idx.view(-1, 1), idx.view(1, -1))
            has_diff = different.any(1, keepdim=True)
            fallback = torch.where(has_diff, different, not_self)
        w = torch.where(bad.view(-1, 1), fallback.float(), w)
    return w, n_bad


def sample_negatives(weights, vectorized=False):
    """One negative index per row ~ Multinomial(weights[b]); row by row as the official loop unless vectorized."""
    if vectorized:
        return torch.multinomial(weights, 1).squeeze(1)
    return torch.stack([torch.multinomial(weights[b], 1).squeeze(0) for b in range(weights.shape[0])])


def itm_loss(logits, batch_size):
    """Cross-entropy of [positives (B); negatives (2B)] with labels [1]*B + [0]*2B."""
    labels = torch.cat([torch.ones(batch_size, dtype=torch.long),
                        torch.zeros(2 * batch_size, dtype=torch.long)]).to(logits.device)
    return F.cross_entropy(logits.float(), labels)


def mask_tokens(input_ids, vocab_size, probability, pad_token_id, cls_token_id, mask_token_id, targets=None):
    """Official MLM corruption (the BERT masking rule as the official code draws it), in place on `input_ids`;
    returns (input_ids, targets).

    Bernoulli(p) selection without [PAD]/[CLS]; 80% [MASK], then half of the rest random ids in [0, vocab).
    """
    device = input_ids.device
    masked = torch.bernoulli(torch.full(input_ids.shape, probability)).bool().to(device)
    masked[input_ids == pad_token_id] = False
    masked[input_ids == cls_token_id] = False
    if targets is not None:
        targets[~masked] = -100
    replaced = torch.bernoulli(torch.full(input_ids.shape, 0.8)).bool().to(device) & masked
    input_ids[replaced] = mask_token_id
    random_pos = torch.bernoulli(torch.full(input_ids.shape, 0.5)).bool().to(device) & masked & ~replaced
    random_words = torch.randint(vocab_size, input_ids.shape, dtype=torch.long).to(device)
    input_ids[random_pos] = random_words[random_pos]
    return input_ids, targets


def mlm_loss(logits, labels, soft_labels=None, alpha=0.0, softmax_dim='vocab'):
    """(1 - alpha) * CE + alpha * soft CE over positions with labels != -100; zero (not NaN) when none."""
    logits = logits.float()
    selected = labels != -100
    if not bool(selected.any()):
        return logits.sum() * 0.0
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1))
    if soft_labels is not None and not distillation_off(alpha):
        dim = -1 if softmax_dim == 'vocab' else 1  # 'seq': the pre-2022-03 official bug (issue #58)
        distill = -torch.sum(F.log_softmax(logits, dim=dim) * soft_labels, dim=-1)
        loss = (1 - alpha) * loss + alpha * distill[selected].mean()
    return loss


def lm_loss(shifted_logits, targets, reduction='mean', soft_labels=None, alpha=0.0):
    """Causal LM loss on shifted logits; with reduction='none' each row is the summed sequence NLL."""
    shifted_logits = shifted_logits.float()
    V = shifted_logits.size(-1)
    loss = F.cross_entropy(shifted_logits.view(-1, V), targets.view(-1), reduction=reduction)
    if reduction == 'none':
        loss = loss.view(shifted_logits.size(0), -1).sum(1)
    if soft_labels is not None and not distillation_off(alpha):
        distill = -torch.sum(F.log_softmax(shifted_logits, dim=-1) * soft_labels, dim=-1)
        distill = (distill * (targets != -100)).sum(1)
        loss = (1 - alpha) * loss + alpha * distill
    return loss


def distill_classification_loss(logits, logits_m, targets, alpha):
    """(1 - alpha) * CE(logits, y) - alpha * mean_b sum_c log_softmax(logits) * softmax(logits_m) (NLVR2, VE)."""
    logits = logits.float()
    ce = F.cross_entropy(logits, targets)
    if logits_m is None:
        return ce
    soft = -torch.sum(F.log_softmax(logits, dim=1) * F.softmax(logits_m.float(), dim=1), dim=1).mean()
    return (1 - alpha) * ce + alpha * soft


def vqa_loss(per_answer_loss, weights, num_questions):
    """sum(weight * per-answer loss) / number of questions (not divided by the weights' sum; docs/QUIRKS.md)."""
    return (weights.to(per_answer_loss.dtype) * per_answer_loss).sum() / num_questions


def answer_sequence_scores(topk_first_probs, answer_nll, first_token_once=False):
    """Ranking score log p(first token) - sequence NLL per kept answer [B, k].

    The sequence NLL already includes the first answer token, so the official score counts it twice (docs/QUIRKS.md);
    `first_token_once` scores the sequence log-probability alone.
    """
    if first_token_once:
        return -answer_nll
    return topk_first_probs.log() - answer_nll


# ---- VLMo (docs/README_vlmo.md) ---------------------------------------------------------------------------------
# VLMo (Bao et al., NeurIPS 2022) objectives as the official code computes them: in-batch contrastive learning over
# features gathered from every rank (no queue, no distillation), ITM with hard negatives drawn from the global batch,
# MLM with whole-word masking and weight 0.25, and the VQA soft-score BCE scaled by the number of answers.
def vlmo_contrastive(image_feats, text_feats, logit_scale):
    """(i2t logits, t2i logits, loss): S = exp(logit_scale) * F_i F_t^T (no clamp), targets arange(N),
    loss = (CE(S) + CE(S^T)) / 2, in fp32."""
    i2t = logit_scale.exp() * image_feats.float() @ text_feats.float().t()
    t2i = i2t.t()
    labels = torch.arange(i2t.shape[0], device=i2t.device)
    return i2t, t2i, (F.cross_entropy(i2t, labels) + F.cross_entropy(t2i, labels)) / 2


def vlmo_negative_weights(logits_local):
    """Hard-negative weights of the B local rows of [B, N] ITC logits (local block first): softmax over the global
    batch with the own positive (column b of row b) zeroed; non-finite entries become 0 and an all-zero row falls back
    to uniform over j != b (healthy rows unchanged). N = 1 is refused."""
    B, N = logits_local.shape
    if N < 2:
        raise ValueError('VLMo ITM hard negatives need at least 2 image-text pairs in the global batch '
                         '(batch_size_train * world_size >= 2)')
    w = F.softmax(logits_local.float(), dim=1)
    w.fill_diagonal_(0)
    w = torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
    bad = w.sum(1) <= 0
    if bool(bad.any()):
        not_self = torch.ones_like(w, dtype=torch.bool)
        not_self[torch.arange(B), torch.arange(B)] = False
        w = torch.where(bad.view(-1, 1), not_self.float(), w)
    return w


def vlmo_itm_labels(batch_size, device=None):
    """[1]*B (positives) + [0]*2B ((text, negative image), (negative text, image))."""
    labels = torch.cat([torch.ones(batch_size, dtype=torch.long), torch.zeros(2 * batch_size, dtype=torch.long)])
    return labels.to(device)


def vlmo_mlm_loss(logits, labels):
    """Token-mean cross-entropy over labels != -100 (the caller applies the 0.25 weight of stage 3); zero, not NaN,
    when a batch has no masked token."""
    logits = logits.float()
    if not bool((labels != -100).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)


def vlmo_vqa_loss(logits, targets):
    """BCE-with-logits against soft scores, mean over B*C, times C (the official scaling)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.shape[1]


def vlmo_vqa_targets(labels, scores, num_labels):
    """Dense [B, C] soft targets: targets[b, labels[b][j]] = scores[b][j]."""
    targets = torch.zeros(len(labels), num_labels)
    for b, (ls, ss) in enumerate(zip(labels, scores)):
        for label, score in zip(ls, ss):
            targets[b, label] = score
    return targets


def vlmo_lr_factor(step, max_steps, warmup_steps, power=1.0, end_factor=0.0):
    """Linear warm-up then polynomial decay (power 1: linear) as a multiple of the base lr at optimiser step `step`
    (0-based; the first step uses 0)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if step > max_steps:
        return end_factor
    remaining = 1.0 - (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return (1.0 - end_factor) * remaining ** power + end_factor


def vlmo_cosine_lr_factor(step, max_steps, warmup_steps):
    """Linear warm-up then half a cosine to 0 (the official `decay_power: cosine`, transformers 4.8.1
    get_cosine_schedule_with_warmup with num_cycles 0.5) as a multiple of the base lr at optimiser step `step`.
    As there, past `max_steps` the cosine is not clamped at 0 but continues (it rises again); the engine never
    steps past `max_steps`."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def vlmo_whole_word_mask(input_ids, subword, special_ids, mask_token_id, vocab_size, probability=0.15,
                         max_predictions=512, rng=None):
    """Whole-word masking of fixed-length texts as transformers 4.8.1's DataCollatorForWholeWordMask does it
    (paper: 15 % of tokens; docs/README_vlmo.md "Whole-word masking"). Per row: candidate groups are all positions
    except [CLS]/[SEP] (padding included), a word-piece (`subword[id]`) joining the previous group; the groups are
    shuffled with Python's `rng`; k = min(max_predictions, max(1, round(probability * L))) positions are taken group
    by group (a group that would exceed k is skipped); special ids are then unselected. Selected positions become
    [MASK] with probability 0.8, else a random id with probability 0.5, else stay (torch RNG). `special_ids` is
    ([CLS], [SEP], other special ids such as [PAD], [UNK], [MASK]). Returns (masked ids, labels with -100 at
    unselected positions)."""
    import random as _random
    rng = rng or _random
    ids = input_ids.clone()
    B, L = ids.shape
    selected = torch.zeros(B, L, dtype=torch.bool)
    cls_sep = {int(s) for s in special_ids[:2]}
    special = torch.zeros(max(vocab_size, int(ids.max()) + 1, max(special_ids) + 1), dtype=torch.bool)
    special[list(special_ids)] = True
    k = min(max_predictions, max(1, int(round(L * probability))))
    rows = ids.tolist()
    for b in range(B):
        groups = []
        for i, tok in enumerate(rows[b]):
            if tok in cls_sep:
                continue
            if groups and bool(subword[tok]):
                groups[-1].append(i)
            else:
                groups.append([i])
        rng.shuffle(groups)
        taken = []
        for g in groups:
            if len(taken) >= k:
                break
            if len(taken) + len(g) > k:
                continue
            taken.extend(g)
        selected[b, taken] = True
    selected &= ~special[ids.cpu()]
    selected = selected.to(ids.device)
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    replaced = torch.bernoulli(torch.full((B, L), 0.8)).bool().to(ids.device) & selected
    ids[replaced] = mask_token_id
    randomised = torch.bernoulli(torch.full((B, L), 0.5)).bool().to(ids.device) & selected & ~replaced
    words = torch.randint(vocab_size, (B, L), dtype=torch.long).to(ids.device)
    ids[randomised] = words[randomised]
    return ids, labels


def vlmo_fixed_length_text(input_ids, attention_mask, length, sep_token_id, pad_token_id=0):
    """`[CLS] pieces` texts (any padding, no [SEP]) as VLMo's `[CLS] pieces [SEP]` padded to exactly `length`;
    truncation keeps the [SEP]. Returns (ids, mask) [B, length]."""
    B = input_ids.shape[0]
    n = attention_mask.long().sum(1).clamp(max=length - 1)
    pos = torch.arange(length, device=input_ids.device).expand(B, -1)
    src = input_ids[:, :length]
    if src.shape[1] < length:
        src = F.pad(src, (0, length - src.shape[1]), value=pad_token_id)
    ids = torch.where(pos < n[:, None], src, torch.full_like(src, pad_token_id))
    ids = torch.where(pos == n[:, None], torch.full_like(src, sep_token_id), ids)
    return ids, (pos <= n[:, None]).long()


# ---- CODIS (docs/README_codis.md) ------------------------------------------------------------------------------
# CODIS (Duan et al., CVPR 2022) aligns image and text through their assignments to a shared codebook. No code or
# equation of the paper is public: every formula below is a labelled default of the reconstruction ("CODIS D-n",
# listed in docs/README_codis.md) and each alternative is selected by a config value of the `codis:` block.
def codebook_scores(features, codebook, temp=1.0):
    """Cosine scores of unit `features` [N, d] against the row-normalised `codebook` [K, d], divided by `temp`, in
    fp32 (CODIS D-1: the codes live in the ITC embedding space)."""
    with torch.autocast(device_type=features.device.type, enabled=False):  # fp32 also under bf16 autocast
        return features.float() @ F.normalize(codebook.float(), dim=-1).t() / temp


def sinkhorn(scores, eps=0.05, iters=3):
    """Equipartitioned soft codes [N, K] of the scores [N, K] (CODIS D-5: SwAV's Sinkhorn-Knopp), fp32, no gradient.

    The SwAV iteration on P = exp(S / eps)^T [K, N]: `iters` times, each cluster row is divided by its sum and by K,
    then each sample column by its sum and by N; the result is N * P^T, so every sample's codes sum to 1 and every
    cluster's mass tends to N / K. It runs in log space (the same iteration, written with logsumexp), so a small eps
    never underflows to 0/0 in fp32. iters 0 gives the per-sample softmax(S / eps) (no equipartition).
    """
    with torch.no_grad():
        logits = scores.detach().float() / eps
        if iters == 0:
            return F.softmax(logits, dim=1)
        n, k = logits.shape
        log_p = logits - torch.logsumexp(logits.reshape(-1), dim=0)  # P / sum(P)
        log_n, log_k = torch.log(torch.tensor(float(n))), torch.log(torch.tensor(float(k)))
        for _ in range(iters):
            log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) - log_k  # each cluster: sum 1 / K
            log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True) - log_n  # each sample: sum 1 / N
        return torch.exp(log_p + log_n)


def code_cross_entropy(targets, student_logits):
    """H(q, p) = -mean_b sum_k q_bk log p_bk with p = softmax(student_logits); the targets are constants."""
    return -torch.sum(targets.detach() * F.log_softmax(student_logits.float(), dim=1), dim=1).mean()


def code_swap_loss(q_image, q_text, logits_image, logits_text):
    """CODIS D-4 (`code_loss: swapped`): 1/2 [H(q_text, p_image) + H(q_image, p_text)], the text teacher's codes are
    the image student's targets and the image teacher's codes the text student's."""
    return (code_cross_entropy(q_text, logits_image) + code_cross_entropy(q_image, logits_text)) / 2


def code_intra_loss(q_image, q_text, logits_image, logits_text):
    """CODIS D-4 (`code_intra: true`): the same-modality term 1/2 [H(q_image, p_image) + H(q_text, p_text)]."""
    return (code_cross_entropy(q_image, logits_image) + code_cross_entropy(q_text, logits_text)) / 2


def assignment_contrast_loss(q_image, q_text, logits_image, logits_text, offset=0):
    """CODIS D-4 alternative (`code_loss: assignment_contrast`): InfoNCE over code assignments.

    s(b, j) = sum_k q_text[j, k] log p_image[b, k] for every teacher row j (the global batch, [G, K]); softmax over j
    with target j = offset + b; symmetric for the text students; the mean of both directions.
    """
    logp_image = F.log_softmax(logits_image.float(), dim=1)
    logp_text = F.log_softmax(logits_text.float(), dim=1)
    target = torch.arange(logits_image.shape[0], device=logits_image.device) + offset
    s_i = logp_image @ q_text.detach().float().t()
    s_t = logp_text @ q_image.detach().float().t()
    return (F.cross_entropy(s_i, target) + F.cross_entropy(s_t, target)) / 2


def intra_contrast(feat, feat_m, queue, temp, alpha=0.0, distill=False):
    """CODIS D-3 in-modal contrast of one modality: S = f . [f_m ; queue] / temp [B, B + Q], target the in-batch
    diagonal (the teacher's feature of the same input); with `distill`, ALBEF's momentum-distillation targets
    alpha * softmax(f_m . [f_m ; queue] / temp) + (1 - alpha) * one-hot. `queue` is [d, Q] as stored."""
    with torch.autocast(device_type=feat.device.type, enabled=False):  # fp32 also under bf16 autocast
        keys = torch.cat([feat_m.t(), queue.detach()], dim=1).float()
        sim = feat.float() @ keys / temp
        with torch.no_grad():
            targets = identity_targets(sim)
            if distill:
                targets = distill_targets(feat_m.float() @ keys / temp, targets, alpha)
        return soft_cross_entropy(sim, targets)


def recent_queue_columns(queue, ptr, n):
    """The `n` queue columns written most recently before pointer `ptr` (ptr - n ... ptr - 1, modulo Q), oldest
    first, as rows [n, d] (CODIS D-5: the teacher samples of Sinkhorn beyond the batch)."""
    size = queue.shape[1]
    n = min(int(n), size)
    cols = (torch.arange(n, device=queue.device) + int(ptr) - n) % size
    return queue[:, cols].t()


def code_perplexity(probs):
    """exp(entropy of the mean code distribution) of probs [N, K]: K when codes are used evenly, 1 at collapse."""
    mean = probs.float().mean(0)
    return torch.exp(-(mean * torch.log(mean.clamp_min(1e-12))).sum())


def code_agreement(logits_image, logits_text):
    """Fraction of pairs whose image and text argmax codes are equal."""
    return (logits_image.argmax(1) == logits_text.argmax(1)).float().mean()


def agreement_by_chance(codes_image, codes_text, k):
    """The agreement of independent codes with the observed marginals: sum_k freq_image(k) * freq_text(k)."""
    fi = torch.bincount(codes_image, minlength=k).float() / max(1, codes_image.numel())
    ft = torch.bincount(codes_text, minlength=k).float() / max(1, codes_text.numel())
    return float((fi * ft).sum())


# ---- SIMLA (docs/README_simla.md) ------------------------------------------------------------------------------
# SIMLA (Khan et al., ECCV 2022): cross-modal masked image modelling (MIM, paper Eq. 6-7) and pseudo-keyword
# prediction (PSL, paper Eq. 8-9), on top of ALBEF's ITC / ITM / MLM above, which SIMLA reuses unchanged.
def lm_loss_seq_distill(shifted_logits, targets, reduction='mean', soft_labels=None, alpha=0.0):
    """`lm_loss` whose distillation log-softmax runs over dim 1, the sequence (SIMLA's release decoder, and ALBEF's
    before its fix): (1 - alpha) * NLL + alpha * sum over non-ignored targets of -sum_v log_softmax(., dim=1) * soft."""
    loss = lm_loss(shifted_logits, targets, reduction)
    if soft_labels is None or distillation_off(alpha):
        return loss
    distill = -torch.sum(F.log_softmax(shifted_logits.float(), dim=1) * soft_labels, dim=-1)
    distill = (distill * (targets != -100)).sum(1)
    return (1 - alpha) * loss + alpha * distill


def mim_loss(logits, codes, soft_targets=None, alpha=0.0):
    """MIM over the masked patches: (1 - alpha) * CE(logits, codes) + alpha * mean(-sum_v log_softmax(logits) * soft).

    `logits` [M, V_img] of the M masked patches of the batch (row-major), `codes` [M] their visual-token ids,
    `soft_targets` [M, V_img] the momentum branch's softmax. Zero (graph kept) when nothing is masked."""
    logits = logits.float()
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    loss = F.cross_entropy(logits, codes)
    if soft_targets is None or distillation_off(alpha):
        return loss
    distill = -torch.sum(F.log_softmax(logits, dim=-1) * soft_targets, dim=-1).mean()
    return (1 - alpha) * loss + alpha * distill


@torch.no_grad()
def mim_accuracy(logits, codes):
    """(accuracy of the argmax code over the M masked patches, the share of the most frequent code among them: the
    accuracy of always answering that code); (nan, nan) when nothing is masked. Monitoring, not optimised."""
    if codes.numel() == 0:
        nan = torch.tensor(float('nan'), device=codes.device)
        return nan, nan
    accuracy = (logits.argmax(-1) == codes).float().mean()
    majority = torch.bincount(codes).max().float() / codes.numel()
    return accuracy, majority


def _order_desc(primary, secondary=None):
    """Positions [B, L] sorted by `primary` descending, ties by `secondary` descending, then by smaller position."""
    if secondary is None:
        return torch.sort(primary, dim=1, descending=True, stable=True).indices
    first = torch.sort(secondary, dim=1, descending=True, stable=True).indices
    second = torch.sort(primary.gather(1, first), dim=1, descending=True, stable=True).indices
    return first.gather(1, second)


def psl_head_vote_positions(cls_rows, topk_per_head=4, num_keywords=5):
    """The release's keyword positions [B, K]: each head's `topk_per_head` most attended key positions of the
    [CLS]-query row `cls_rows` [B, H, L] vote; the `num_keywords` positions with most votes win.

    Ties are broken deterministically (the release leaves them to torch.topk): within a head by smaller position;
    between positions by larger summed attention over the heads, then smaller position."""
    B, H, L = cls_rows.shape
    rows = cls_rows.float()
    per_head = torch.sort(rows.reshape(B * H, L), dim=1, descending=True, stable=True).indices
    per_head = per_head[:, :min(topk_per_head, L)].reshape(B, -1)
    votes = torch.zeros(B, L, dtype=torch.long, device=rows.device)
    votes.scatter_add_(1, per_head, torch.ones_like(per_head))
    return _order_desc(votes, rows.sum(1))[:, :min(num_keywords, L)]


def psl_mean_row_positions(cls_rows, attention_mask, num_keywords=4):
    """The paper-literal reading: the `num_keywords` key positions of largest head-mean attention, position 0 and
    padding excluded; [B, K] with -1 where a caption has fewer valid positions."""
    mean = cls_rows.float().mean(1)
    valid = attention_mask.bool().clone()
    valid[:, 0] = False
    order = _order_desc(mean.masked_fill(~valid, float('-inf')))[:, :min(num_keywords, mean.shape[1])]
    return torch.where(valid.gather(1, order), order, torch.full_like(order, -1))


def psl_targets(cls_rows, input_ids, vocab_size, drop_ids, selection='head_vote', topk_per_head=4, num_keywords=5,
                attention_mask=None):
    """Multi-hot keyword targets y [B, vocab_size] (float) from the last-layer [CLS]-query attention rows
    `cls_rows` [B, H, L] of the caption ids [B, L]: the ids at the selected positions (`selection` 'head_vote' or
    'mean_row'), then y[:, drop_ids] = 0 (the release drops [CLS] only)."""
    if selection == 'head_vote':
        positions = psl_head_vote_positions(cls_rows, topk_per_head, num_keywords)
    elif selection == 'mean_row':
        if attention_mask is None:
            raise ValueError("psl selection 'mean_row' needs the caption attention_mask")
        positions = psl_mean_row_positions(cls_rows, attention_mask, num_keywords)
    else:
        raise ValueError(f"psl selection must be 'head_vote' or 'mean_row', got {selection!r}")
    ids = input_ids.gather(1, positions.clamp_min(0))
    ids = torch.where(positions >= 0, ids, torch.full_like(ids, vocab_size))  # empty slots: an extra column
    targets = torch.zeros(input_ids.shape[0], vocab_size + 1, device=input_ids.device)
    targets.scatter_(1, ids, 1.0)
    targets = targets[:, :vocab_size].contiguous()
    for token in drop_ids:
        targets[:, token] = 0
    return targets


def psl_loss(logits, hard_targets, soft_targets=None, alpha=0.0):
    """(1 - alpha) * BCE(logits, hard) + alpha * BCE(logits, soft), each the mean over all B x V entries."""
    logits = logits.float()
    loss = F.binary_cross_entropy_with_logits(logits, hard_targets)
    if soft_targets is None or distillation_off(alpha):
        return loss
    return (1 - alpha) * loss + alpha * F.binary_cross_entropy_with_logits(logits, soft_targets.float())
