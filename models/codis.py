"""CODIS pretraining model, a reconstruction: ALBEF's pretraining model plus a codebook of cluster centres shared by
image and text, teacher codes by Sinkhorn-Knopp, a cross-modal code loss and in-modal contrast.

CODIS (Duan et al., "Multi-modal Alignment using Representation Codebook", CVPR 2022) has no public code, checkpoint
or equations: everything beyond the abstract is a labelled default "CODIS D-n" of docs/README_codis.md, each one a key
of the config block `codis:` (engine/config.py, configs/codis/Pretrain.yaml). This is not a verified reproduction.

One step (docs/README_codis.md, "One step"): ALBEF's ITC (unchanged) computes the online and momentum unit features;
before the queues take this step's momentum features (`before_enqueue`, the hook of AlbefBase.itc_forward), CODIS adds
- the in-modal contrast (D-3): online image vs [momentum image of the batch ; image queue], likewise for text;
- the teacher codes (D-5): Sinkhorn-Knopp over the momentum features of the (all-gathered) batch followed by the most
  recent queue entries, one problem per modality;
- the student code distributions softmax(f . C^T / code_temp) (D-4) and the swapped cross-modal code loss: the text
  teacher's codes are the image student's targets and vice versa (or the assignment-contrast reading);
then ALBEF's ITM and MLM run unchanged. `forward` returns a dict of the weighted losses (`loss_*`, D-2) and monitoring
values (codebook perplexities, codes used this epoch, image-text code agreement) that train_steps.jsonl logs.
"""
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import losses
from .model_pretrain import ALBEF
from .momentum import concat_all_gather

# The reconstruction's defaults (docs/README_codis.md, table of defaults); configs/codis/Pretrain.yaml states each.
DEFAULTS = {
    'codebook_size': 4096,           # CODIS D-1 (K recalled from the paper, unconfirmed)
    'codebook_dim': None,            # CODIS D-1: None = embed_dim (the ITC space)
    'codebook_init': 'normal',       # CODIS D-1: standard normal, rows L2-normalised
    'codebook_proj': 'shared',       # CODIS D-1: codes read the ITC projections
    'codebook_momentum': False,      # CODIS D-1: teachers use the online codebook
    'codebook_renormalize': True,    # CODIS D-6 (SwAV): unit rows re-imposed every step
    'codebook_freeze_iters': 0,      # CODIS D-6
    'sinkhorn_eps': 0.05,            # CODIS D-5 (SwAV)
    'sinkhorn_iters': 3,             # CODIS D-5 (SwAV)
    'sinkhorn_queue_samples': None,  # CODIS D-5: None = max(0, K - global batch)
    'sinkhorn_joint': False,         # CODIS D-5: one problem per modality
    'code_temp': 0.1,                # CODIS D-4 (SwAV)
    'code_loss': 'swapped',          # CODIS D-4
    'code_intra': False,             # CODIS D-4
    'code_start_iter': 0,            # CODIS D-4
    'intra_view': 'same',            # CODIS D-3
    'intra_distill': False,          # CODIS D-3
    'weight_itc': 0.5, 'weight_intra': 0.5, 'weight_code': 1.0, 'weight_itm': 1.0, 'weight_mlm': 1.0,  # CODIS D-2
}
COLLAPSE_STEPS = 1000  # docs/README_codis.md: warn when a perplexity stays below K/100 this many steps


def codis_options(config):
    """The `codis:` block of the config over DEFAULTS; unknown keys are refused by engine/config.py."""
    return {**DEFAULTS, **(config.get('codis') or {})}


def _rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class CODIS(ALBEF):
    """ALBEF's pretraining model with the CODIS codebook terms; `forward(image, text, alpha)` -> {name: tensor}."""

    def add_task_modules(self, config, bert_config, **task_args):
        super().add_task_modules(config, bert_config, **task_args)
        opts = self.codis = codis_options(config)
        dim = opts['codebook_dim'] or config['embed_dim']
        if dim != config['embed_dim']:
            raise ValueError(f'codis.codebook_dim {dim} must equal embed_dim {config["embed_dim"]}: the codes live in '
                             f'the ITC space (codebook_proj: shared, CODIS D-1)')
        self.codebook = nn.Embedding(opts['codebook_size'], dim)  # weight ~ N(0, 1) (CODIS D-1)
        with torch.no_grad():
            self.codebook.weight.copy_(F.normalize(self.codebook.weight, dim=-1))
        if opts['codebook_momentum']:
            self.model_pairs = type(self).model_pairs + (('codebook', 'codebook_m'),)
        k = opts['codebook_size']
        # monitoring state of the current epoch (not saved): argmax codes seen, summed student distributions
        self.register_buffer('code_seen', torch.zeros(2, k, dtype=torch.bool), persistent=False)
        self.register_buffer('code_prob_sum', torch.zeros(2, k), persistent=False)
        self.register_buffer('code_prob_count', torch.zeros(()), persistent=False)
        self.iteration = 0            # training steps of this process (codebook_freeze_iters, code_start_iter)
        self._low_perplexity_steps = 0
        self._terms = None

    def momentum_copy(self, name, config):
        if name == 'codebook':
            return nn.Embedding(*self.codebook.weight.shape)
        return super().momentum_copy(name, config)

    def train(self, mode=True):
        """nn.Module.train; entering training mode starts a new epoch of codebook statistics (the engine calls
        model.train() at the start of every epoch)."""
        super().train(mode)
        if mode and hasattr(self, 'code_seen'):
            self.code_seen.zero_()
            self.code_prob_sum.zero_()
            self.code_prob_count.zero_()
        return self

    # ---- the step ----------------------------------------------------------------------------------------------
    def forward(self, image, text, alpha=0):
        opts = self.codis
        if opts['codebook_renormalize'] and self.training:
            # CODIS D-6: unit rows after every optimiser step, applied before the next use
            with torch.no_grad():
                self.codebook.weight.copy_(F.normalize(self.codebook.weight, dim=-1))
        self._terms = {}
        loss_mlm, loss_ita, loss_itm = super().forward(image, text, alpha)
        terms, self._terms = self._terms, None
        out = {'loss_mlm': opts['weight_mlm'] * loss_mlm, 'loss_ita': opts['weight_itc'] * loss_ita,
               'loss_itm': opts['weight_itm'] * loss_itm}
        out.update(terms)
        if self.training:
            self.iteration += 1
        return out

    def before_enqueue(self, image_feat, text_feat, image_feat_m, text_feat_m, alpha):
        """The CODIS terms, against the queues as they stand before this step's enqueue (CODIS D-3, D-4, D-5)."""
        if self._terms is None:
            return
        opts = self.codis
        terms = self._terms
        if opts['weight_intra']:
            loss_i2i = losses.intra_contrast(image_feat, image_feat_m, self.image_queue, self.temp, alpha,
                                             opts['intra_distill'])
            loss_t2t = losses.intra_contrast(text_feat, text_feat_m, self.text_queue, self.temp, alpha,
                                             opts['intra_distill'])
            terms['loss_intra'] = opts['weight_intra'] * (loss_i2i + loss_t2t) / 2
        frozen = self.iteration < opts['codebook_freeze_iters']
        codebook = self.codebook.weight.detach() if frozen else self.codebook.weight
        logits_image = losses.codebook_scores(image_feat, codebook, opts['code_temp'])
        logits_text = losses.codebook_scores(text_feat, codebook, opts['code_temp'])
        q_image, q_text, offset = self.teacher_codes(image_feat_m, text_feat_m)
        if opts['weight_code']:
            bs = image_feat.shape[0]
            local_image, local_text = q_image[offset:offset + bs], q_text[offset:offset + bs]
            if opts['code_loss'] == 'swapped':
                loss_code = losses.code_swap_loss(local_image, local_text, logits_image, logits_text)
            else:
                loss_code = losses.assignment_contrast_loss(q_image, q_text, logits_image, logits_text, offset)
            if opts['code_intra']:
                loss_code = (loss_code + losses.code_intra_loss(local_image, local_text, logits_image,
                                                                logits_text)) / 2
            weight = opts['weight_code'] if self.iteration >= opts['code_start_iter'] else 0.0
            terms['loss_code'] = weight * loss_code
        terms.update(self.code_monitoring(logits_image, logits_text, q_image, q_text))

    @torch.no_grad()
    def teacher_codes(self, image_feat_m, text_feat_m):
        """Sinkhorn codes (CODIS D-5) of the global batch's momentum features [G, K] per modality, computed with the
        most recent queue entries as extra samples, and the row offset of this process's batch."""
        opts = self.codis
        codebook = (self.codebook_m if opts['codebook_momentum'] else self.codebook).weight
        feats_image, feats_text = concat_all_gather(image_feat_m), concat_all_gather(text_feat_m)
        g = feats_image.shape[0]
        n_sk = opts['sinkhorn_queue_samples']
        if n_sk is None:
            n_sk = max(0, codebook.shape[0] - g)
        ptr = int(self.queue_ptr)
        scores = []
        for feats, queue in ((feats_image, self.image_queue), (feats_text, self.text_queue)):
            samples = torch.cat([feats.float(), losses.recent_queue_columns(queue, ptr, n_sk).float()])
            scores.append(losses.codebook_scores(samples, codebook))
        eps, iters = opts['sinkhorn_eps'], opts['sinkhorn_iters']
        if opts['sinkhorn_joint']:
            codes = losses.sinkhorn(torch.cat(scores), eps, iters)
            n = scores[0].shape[0]
            q_image, q_text = codes[:n], codes[n:]
        else:
            q_image, q_text = losses.sinkhorn(scores[0], eps, iters), losses.sinkhorn(scores[1], eps, iters)
        return q_image[:g], q_text[:g], _rank() * image_feat_m.shape[0]

    @torch.no_grad()
    def code_monitoring(self, logits_image, logits_text, q_image, q_text):
        """Per-step codebook statistics (logged, not optimised) and the epoch accumulators."""
        k = logits_image.shape[1]
        p_image, p_text = F.softmax(logits_image, dim=1), F.softmax(logits_text, dim=1)
        self.code_seen[0, logits_image.argmax(1)] = True
        self.code_seen[1, logits_text.argmax(1)] = True
        self.code_prob_sum[0] += p_image.sum(0)
        self.code_prob_sum[1] += p_text.sum(0)
        self.code_prob_count += p_image.shape[0]
        perplexity_image, perplexity_text = losses.code_perplexity(p_image), losses.code_perplexity(p_text)
        if min(float(perplexity_image), float(perplexity_text)) < k / 100:
            self._low_perplexity_steps += 1
            if self._low_perplexity_steps == COLLAPSE_STEPS:
                warnings.warn(f'CODIS codebook collapse: a code perplexity has stayed below K/100 = {k / 100:g} for '
                              f'{COLLAPSE_STEPS} steps')
        else:
            self._low_perplexity_steps = 0
        teacher = torch.cat([q_image, q_text])
        teacher_entropy = -(teacher * torch.log(teacher.clamp_min(1e-12))).sum(1).mean()
        return {'code_perplexity_image': perplexity_image, 'code_perplexity_text': perplexity_text,
                'codes_used_image': self.code_seen[0].sum().float(), 'codes_used_text': self.code_seen[1].sum().float(),
                'code_agreement': losses.code_agreement(logits_image, logits_text),
                'code_teacher_entropy': teacher_entropy}

    # ---- evaluation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluation_metrics(self, image_embeds, text_embeds, txt2img):
        """Codebook metrics for Pretrain.py's evaluation: the training epoch's usage (perplexity of the epoch-mean
        student distribution, codes that were an argmax) and, on held-out pairs (unit ITC features of the images
        and texts, text i describing image txt2img[i]), the image-text argmax code agreement beside chance."""
        k = self.codebook.weight.shape[0]
        out = {}
        if float(self.code_prob_count) > 0:
            mean = self.code_prob_sum / self.code_prob_count
            for row, name in enumerate(('image', 'text')):
                p = mean[row]
                out[f'train_epoch_code_perplexity_{name}'] = float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))
                out[f'train_epoch_codes_used_{name}'] = int(self.code_seen[row].sum())
        codebook = self.codebook.weight
        logits_image = losses.codebook_scores(image_embeds, codebook, self.codis['code_temp'])
        logits_text = losses.codebook_scores(text_embeds, codebook, self.codis['code_temp'])
        pairs = torch.as_tensor([txt2img[i] for i in range(text_embeds.shape[0])], device=logits_image.device)
        codes_image, codes_text = logits_image.argmax(1)[pairs], logits_text.argmax(1)
        out.update({
            'heldout_code_agreement': float((codes_image == codes_text).float().mean()),
            'heldout_code_agreement_chance': losses.agreement_by_chance(codes_image, codes_text, k),
            'heldout_code_agreement_uniform': 1.0 / k,
            'heldout_code_perplexity_image': float(losses.code_perplexity(F.softmax(logits_image, 1))),
            'heldout_code_perplexity_text': float(losses.code_perplexity(F.softmax(logits_text, 1))),
            'heldout_codes_used_image': int(codes_image.unique().numel()),
            'heldout_codes_used_text': int(codes_text.unique().numel()),
        })
        return out
