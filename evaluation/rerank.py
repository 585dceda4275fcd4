"""Two-stage retrieval evaluation: ITC candidates, then ITM re-ranking (spec 12.1 steps 3-6, 16.6).

Two re-rankers give the same score matrices (to fp32 rounding):
- `rerank_reference`: the official procedure, one fusion call per query row with the image tokens repeated k times;
- `rerank_fast`: every unique candidate pair of both directions scored once, in large batches grouped by image, with
  each image's cross-attention keys/values computed once per layer (not once per pair) and text padding trimmed.

Rows are split across ranks in the official contiguous blocks of floor(n / W) + 1; every rank fills only its rows
(zeros elsewhere) and the rows are then summed across ranks, which gathers them exactly (spec 12.1 step 6: no
summed -100 fills), so one and several processes give the same matrices.
"""
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from evaluation.retrieval import extract_image_features, extract_text_features, text_backbone
from models.xbert import extended_self_mask

NO_CANDIDATE = -100.0
SCORE_RULES = ('itm', 'itm+itc')


class RetrievalFeatures(NamedTuple):
    """Everything the re-ranking needs: ViT tokens, text-mode states and masks, normalised ITC embeddings."""

    image_feats: torch.Tensor   # [Ni, N, D]
    image_embeds: torch.Tensor  # [Ni, E]
    text_feats: torch.Tensor    # [Nt, L, D]
    text_masks: torch.Tensor    # [Nt, L]
    text_embeds: torch.Tensor   # [Nt, E]


@torch.no_grad()
def extract_features(model, image_loader, texts, tokenizer, device):
    """Encode every caption (fixed length 30, chunks of 256) and every image (loader order, no shuffle)."""
    text_feats, text_masks, text_embeds = extract_text_features(model, texts, tokenizer, device)
    image_feats, image_embeds = extract_image_features(model, image_loader, device)
    return RetrievalFeatures(image_feats, image_embeds, text_feats, text_masks, text_embeds)


def owned_rows(n, world_size, rank):
    """The official contiguous row block [start, end) of `rank`: blocks of floor(n / W) + 1 rows."""
    step = n // world_size + 1
    start = min(n, rank * step)
    return start, min(n, start + step)


def topk_candidates(sims, k):
    """Top-k columns of each row by ITC similarity: (values, indices), k capped at the number of columns."""
    return sims.topk(k=min(k, sims.shape[1]), dim=1)


def _check_rule(score):
    if score not in SCORE_RULES:
        raise ValueError(f'rerank_score must be one of {SCORE_RULES}, got {score!r}')


def _empty_scores(rows, cols, start, end, device):
    """Zeros (rows of other ranks) with -100 on this rank's rows."""
    scores = torch.zeros(rows, cols, device=device)
    scores[start:end] = NO_CANDIDATE
    return scores


# ---- the reference (official) procedure --------------------------------------------------------------------------
@torch.no_grad()
def rerank_reference(model, feats, sims, k_test, score='itm', world_size=1, rank=0, progress=False):
    """Official re-ranking: per image (then per text) one fusion pass over its k candidates; own rows only."""
    _check_rule(score)
    device = sims.device
    n_img, n_txt = sims.shape
    i2t = _empty_scores(n_img, n_txt, *owned_rows(n_img, world_size, rank), device)
    start, end = owned_rows(n_img, world_size, rank)
    top_sim, top_idx = topk_candidates(sims[start:end], k_test)
    for i in tqdm(range(start, end), desc='i2t re-rank', disable=not progress):
        cand, cand_sim = top_idx[i - start], top_sim[i - start]
        k = cand.numel()
        image = feats.image_feats[i].repeat(k, 1, 1)
        logit = model.itm_score(feats.text_feats[cand], feats.text_masks[cand], image).float()
        i2t[i, cand] = logit + cand_sim if score == 'itm+itc' else logit

    t2i = _empty_scores(n_txt, n_img, *owned_rows(n_txt, world_size, rank), device)
    start, end = owned_rows(n_txt, world_size, rank)
    top_sim, top_idx = topk_candidates(sims.t()[start:end], k_test)
    for t in tqdm(range(start, end), desc='t2i re-rank', disable=not progress):
        cand, cand_sim = top_idx[t - start], top_sim[t - start]
        k = cand.numel()
        logit = model.itm_score(feats.text_feats[t].repeat(k, 1, 1), feats.text_masks[t].repeat(k, 1),
                                feats.image_feats[cand]).float()
        t2i[t, cand] = logit + cand_sim if score == 'itm+itc' else logit
    return i2t, t2i


# ---- the fast re-ranker ------------------------------------------------------------------------------------------
def candidate_pairs(sims, k_test, world_size=1, rank=0):
    """Unique (image, text) pairs needed by this rank's i2t and t2i rows, sorted by image then text.

    Returns (pair_image, pair_text, i2t_rows, i2t_pair, t2i_rows, t2i_pair): row r of direction d has its
    candidates' scores at `d_pair[r]` (indices into the unique pairs), for the rows `d_rows`.
    """
    n_img, n_txt = sims.shape
    s, e = owned_rows(n_img, world_size, rank)
    i2t_top = topk_candidates(sims[s:e], k_test)[1]
    i2t_img = torch.arange(s, e, device=sims.device).view(-1, 1).expand_as(i2t_top)
    s2, e2 = owned_rows(n_txt, world_size, rank)
    t2i_top = topk_candidates(sims.t()[s2:e2], k_test)[1]
    t2i_txt = torch.arange(s2, e2, device=sims.device).view(-1, 1).expand_as(t2i_top)
    codes = torch.cat([(i2t_img * n_txt + i2t_top).reshape(-1), (t2i_top * n_txt + t2i_txt).reshape(-1)])
    unique, inverse = torch.unique(codes, sorted=True, return_inverse=True)
    n_i2t = i2t_top.numel()
    return (unique // n_txt, unique % n_txt, (s, e, i2t_top), inverse[:n_i2t].view_as(i2t_top),
            (s2, e2, t2i_top), inverse[n_i2t:].view_as(t2i_top))


def image_chunks(pair_image, pair_batch):
    """[start, end) ranges over the image-sorted pairs, cut at image boundaries, about `pair_batch` pairs each."""
    _, counts = torch.unique_consecutive(pair_image, return_counts=True)
    chunks, start, size = [], 0, 0
    for count in counts.tolist():
        if size and size + count > pair_batch:
            chunks.append((start, start + size))
            start, size = start + size, 0
        size += count
    if size:
        chunks.append((start, start + size))
    return chunks


def grouped_cross_attention(attn, hidden, image_states, slot, groups, per_group):
    """Cross-attention of P text rows against U images with each image's K/V computed once.

    The queries of all texts of one image are laid side by side along the query axis ([U, heads, C*L, d]), which
    is exact because cross-attention rows are independent and image masks are all ones.
    """
    P, L, D = hidden.shape
    heads, d = attn.num_attention_heads, attn.attention_head_size
    query = attn.query(hidden)
    q = query.new_zeros(groups * per_group, L, D)  # query's dtype: bf16 under autocast
    q[slot] = query
    q = q.view(groups, per_group * L, heads, d).transpose(1, 2)
    n = image_states.shape[1]
    k = attn.key(image_states).view(groups, n, heads, d).transpose(1, 2)
    v = attn.value(image_states).view(groups, n, heads, d).transpose(1, 2)
    context = F.scaled_dot_product_attention(q, k, v)
    return context.transpose(1, 2).reshape(groups * per_group, L, D)[slot]


def fuse_grouped(bert, text_states, text_mask, image_states, group, slot, per_group):
    """The fusion layers (mode 'fusion') for text rows whose images are `image_states[group]`."""
    self_mask = extended_self_mask(text_mask, False, text_states.dtype)
    hidden = text_states
    fusion, total = bert.encoder.layer_range('fusion')
    for layer in bert.encoder.layer[fusion:total]:
        hidden = layer.attention(hidden, self_mask)
        cross = layer.crossattention
        context = grouped_cross_attention(cross.self, hidden, image_states, slot, image_states.shape[0], per_group)
        hidden = cross.output(context, hidden)
        hidden = layer.output(layer.intermediate(hidden), hidden)
    return hidden[:, 0, :]


@torch.no_grad()
def score_pairs(model, feats, pair_image, pair_text, pair_batch=1024, trim=True, progress=False):
    """ITM match logits of image-sorted unique pairs, in chunks of about `pair_batch` pairs."""
    bert = text_backbone(model)
    scores = torch.empty(pair_image.numel(), device=feats.image_feats.device)
    for start, end in tqdm(image_chunks(pair_image, pair_batch), desc='re-rank', disable=not progress):
        images, texts = pair_image[start:end], pair_text[start:end]
        unique, group, counts = torch.unique_consecutive(images, return_inverse=True, return_counts=True)
        first = torch.cumsum(counts, 0) - counts
        per_group = int(counts.max())
        slot = group * per_group + (torch.arange(end - start, device=images.device) - first[group])
        mask = feats.text_masks[texts]
        length = int(mask.sum(1).max()) if trim else mask.shape[1]
        # dropping all-padding columns is exact: padded keys get exp(-10000) = 0 weight, padded queries are unused
        cls = fuse_grouped(bert, feats.text_feats[texts, :length], mask[:, :length], feats.image_feats[unique],
                           group, slot, per_group)
        scores[start:end] = model.itm_head(cls)[:, 1].float()
    return scores


@torch.no_grad()
def rerank_fast(model, feats, sims, k_test, score='itm', world_size=1, rank=0, pair_batch=1024, trim=True,
                progress=False):
    """Same matrices as `rerank_reference`; each unique pair once, each image's K/V once per chunk and layer."""
    _check_rule(score)
    pair_image, pair_text, (s, e, i2t_top), i2t_pair, (s2, e2, t2i_top), t2i_pair = \
        candidate_pairs(sims, k_test, world_size, rank)
    logits = score_pairs(model, feats, pair_image, pair_text, pair_batch, trim, progress)
    if score == 'itm+itc':
        logits = logits + sims[pair_image, pair_text]
    n_img, n_txt = sims.shape
    i2t = _empty_scores(n_img, n_txt, s, e, sims.device)
    i2t[s:e].scatter_(1, i2t_top, logits[i2t_pair])
    t2i = _empty_scores(n_txt, n_img, s2, e2, sims.device)
    t2i[s2:e2].scatter_(1, t2i_top, logits[t2i_pair])
    return i2t, t2i


# ---- one call for the scripts ------------------------------------------------------------------------------------
def gather_rows(scores):
    """Sum each rank's row blocks (zeros elsewhere) so every rank holds the full matrix; identity alone."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(scores, op=dist.ReduceOp.SUM)
    return scores


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@torch.no_grad()
def evaluate_retrieval(model, image_loader, tokenizer, device, k_test, score='itm', method='fast', pair_batch=1024,
                       progress=True):
    """Score matrices (i2t [Ni, Nt], t2i [Nt, Ni], numpy) of the official two-stage protocol on a re_eval loader."""
    was_training = model.training
    model.eval()
    dataset = image_loader.dataset
    feats = extract_features(model, image_loader, dataset.text, tokenizer, device)
    sims = (feats.image_embeds @ feats.text_embeds.t()).float()
    world_size, rank = _world()
    progress = progress and rank == 0
    if method == 'fast':
        i2t, t2i = rerank_fast(model, feats, sims, k_test, score, world_size, rank, pair_batch, progress=progress)
    elif method == 'reference':
        i2t, t2i = rerank_reference(model, feats, sims, k_test, score, world_size, rank, progress=progress)
    else:
        raise ValueError(f"re-ranking method must be 'fast' or 'reference', got {method!r}")
    i2t, t2i = gather_rows(i2t), gather_rows(t2i)
    model.train(was_training)
    return i2t.cpu().numpy(), t2i.cpu().numpy()
