"""Two-stage retrieval evaluation (the paper's inference): ITC top-k candidates, then ITM re-ranking of those.

Two re-rankers give the same score matrices (to fp32 rounding):
- `rerank_reference`: the official procedure, one fusion call per query row with the image tokens repeated k times;
- `rerank_fast`: every unique candidate pair of both directions scored once, in chunks of pairs grouped by image
  (sized by `chunk_size`: small enough for a CPU's caches, large on a GPU), with each image's cross-attention
  keys/values computed once per chunk and layer (not once per pair) and text padding trimmed.

Rows are split across ranks in the official contiguous blocks of floor(n / W) + 1; every rank fills only its rows
(zeros elsewhere) and the rows are then summed across ranks, which gathers them exactly (the official code sums
-100 fills instead), so one and several processes give the same matrices.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

import utils
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
    text_ids: Optional[torch.Tensor] = None  # [Nt, L], for a model whose fusion pass reads token ids (SIMLA)


def fuses_from_ids(model):
    """True for a model whose ITM pass runs from the caption's token ids (SIMLA's shared stream), not from its
    text-mode states (ALBEF's fusion layers)."""
    return bool(getattr(model, 'fuses_from_ids', False))


@torch.no_grad()
def extract_features(model, image_loader, texts, tokenizer, device):
    """Encode every caption (fixed length 30, chunks of 256) and every image (loader order, no shuffle)."""
    text = extract_text_features(model, texts, tokenizer, device, with_ids=fuses_from_ids(model))
    text_feats, text_masks, text_embeds = text[:3]
    text_ids = text[3] if len(text) == 4 else None  # the ids of a model whose ITM pass reads them (SIMLA)
    image_feats, image_embeds = extract_image_features(model, image_loader, device)
    return RetrievalFeatures(image_feats, image_embeds, text_feats, text_masks, text_embeds, text_ids)


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
    text_in = feats.text_ids if fuses_from_ids(model) else feats.text_feats
    device = sims.device
    n_img, n_txt = sims.shape
    i2t = _empty_scores(n_img, n_txt, *owned_rows(n_img, world_size, rank), device)
    start, end = owned_rows(n_img, world_size, rank)
    top_sim, top_idx = topk_candidates(sims[start:end], k_test)
    for i in tqdm(range(start, end), desc='i2t re-rank', disable=not progress):
        cand, cand_sim = top_idx[i - start], top_sim[i - start]
        k = cand.numel()
        image = feats.image_feats[i].repeat(k, 1, 1)
        logit = model.itm_score(text_in[cand], feats.text_masks[cand], image).float()
        i2t[i, cand] = logit + cand_sim if score == 'itm+itc' else logit

    t2i = _empty_scores(n_txt, n_img, *owned_rows(n_txt, world_size, rank), device)
    start, end = owned_rows(n_txt, world_size, rank)
    top_sim, top_idx = topk_candidates(sims.t()[start:end], k_test)
    for t in tqdm(range(start, end), desc='t2i re-rank', disable=not progress):
        cand, cand_sim = top_idx[t - start], top_sim[t - start]
        k = cand.numel()
        logit = model.itm_score(text_in[t].repeat(k, *[1] * (text_in.dim() - 1)), feats.text_masks[t].repeat(k, 1),
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


# Automatic chunking. Each fusion layer turns a chunk of P pairs into P x text_len rows of several tensors, the
# widest being the FFN's intermediate_size columns (attention scores are not materialised: SDPA). On a CPU the
# elementwise work between the matmuls (bias copies, GELU, LayerNorm, residual adds, gathers) runs at cache speed
# while a chunk's activations stay near the cache sizes and at main-memory speed far above; tiny chunks pay the fixed
# cost of every operator call (and a thread barrier per call, slow on a busy machine) too often. With the tiny model
# (60 KiB per pair) 16 to 384 pairs per chunk ran at the same best speed, 1,024 20-30% and 4,096 50-70% slower
# (1 thread, docs/PERFORMANCE.md); 16 MiB gives 273 pairs. A GPU wants large chunks (kernel launches,
# occupancy). The floor keeps each image's cross-attention K/V shared by enough pairs when a pair is large
# (BERT-base: 360 KiB).
CHUNK_BYTES = {'cpu': 16 * 2 ** 20, 'cuda': 256 * 2 ** 20}
MIN_CHUNK, MAX_CHUNK = 32, 4096


def pair_activation_bytes(bert, text_len, element_size=4):
    """Bytes of the widest fusion-layer activation of one (text, image) pair: text_len rows of the FFN (or of the
    self-attention scores when heads x text_len is wider)."""
    cfg = bert.config
    return text_len * max(cfg.intermediate_size, cfg.hidden_size, cfg.num_attention_heads * text_len) * element_size


def auto_pair_batch(per_pair_bytes, device_type='cpu', chunk_bytes=None):
    """Pairs per chunk such that one chunk's widest activation stays within `chunk_bytes` (default: per device),
    within [MIN_CHUNK, MAX_CHUNK]."""
    budget = CHUNK_BYTES.get(device_type, CHUNK_BYTES['cuda']) if chunk_bytes is None else chunk_bytes
    return int(max(MIN_CHUNK, min(MAX_CHUNK, budget // max(1, per_pair_bytes))))


def chunk_size(model, feats, pair_batch=None, chunk_bytes=None):
    """Pairs per chunk: the automatic size, capped by `pair_batch` when one is given (the `rerank_batch` key)."""
    per_pair = pair_activation_bytes(text_backbone(model), feats.text_feats.shape[1], feats.text_feats.element_size())
    auto = auto_pair_batch(per_pair, feats.image_feats.device.type, chunk_bytes)
    return auto if pair_batch is None else max(1, min(int(pair_batch), auto))


def pair_chunks(pair_image, size):
    """Chunks of the image-sorted pairs, each a list of pieces [start, end) of one image's pairs, largest first.

    The grouped cross-attention pads every image of a chunk to the chunk's largest piece, so chunks cut in image
    order lose when one image is the candidate of many texts (ITC hubs: a chunk of one 640-pair image and 24 of 16
    pairs computes 25 x 640 query slots for 1,024 pairs). Here each image's run is cut into pieces of at most `size`
    pairs, the pieces are sorted by length and packed while pieces x largest piece <= `size` and each piece has at
    least 3/4 of the largest one's pairs: every chunk computes at most `size` query slots, of which padding is at
    most a quarter (usually almost none: most images have about k_test candidates).
    """
    _, counts = torch.unique_consecutive(pair_image, return_counts=True)
    pieces, start = [], 0
    for count in counts.tolist():
        pieces += [(s, min(s + size, start + count)) for s in range(start, start + count, size)]
        start += count
    pieces.sort(key=lambda p: (p[0] - p[1], p[0]))  # longest first, then in pair order
    chunks, current = [], []
    for piece in pieces:
        largest = current[0][1] - current[0][0] if current else 0
        if current and ((len(current) + 1) * largest > size or 4 * (piece[1] - piece[0]) < 3 * largest):
            chunks.append(current)
            current = []
        current.append(piece)
    if current:
        chunks.append(current)
    return chunks


def grouped_cross_attention(attn, hidden, image_states, slot, groups, per_group):
    """Cross-attention of P text rows against U images with each image's K/V computed once.

    The queries of all texts of one image are laid side by side along the query axis ([U, heads, C*L, d]), which
    is exact because cross-attention rows are independent and image masks are all ones. `slot` places row p at
    position slot[p] of the U x C padded rows; None when the rows already fill them in order (no padding).
    """
    P, L, D = hidden.shape
    heads, d = attn.num_attention_heads, attn.attention_head_size
    query = attn.query(hidden)
    if slot is not None:
        q = query.new_zeros(groups * per_group, L, D)  # query's dtype: bf16 under autocast
        q[slot] = query
    else:
        q = query
    q = q.view(groups, per_group * L, heads, d).transpose(1, 2)
    n = image_states.shape[1]
    k = attn.key(image_states).view(groups, n, heads, d).transpose(1, 2)
    v = attn.value(image_states).view(groups, n, heads, d).transpose(1, 2)
    context = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(groups * per_group, L, D)
    return context if slot is None else context[slot]


def fuse_grouped(bert, text_states, text_mask, image_states, slot, per_group):
    """The fusion layers (mode 'fusion') for text rows grouped by image (`slot`: see grouped_cross_attention)."""
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
def score_pairs(model, feats, pair_image, pair_text, pair_batch=None, trim=True, progress=False, chunk_bytes=None):
    """ITM match logits of image-sorted unique pairs, in chunks of at most `chunk_size(...)` query slots."""
    bert = text_backbone(model)
    device = feats.image_feats.device
    scores = torch.empty(pair_image.numel(), device=device)
    size = chunk_size(model, feats, pair_batch, chunk_bytes)
    for pieces in tqdm(pair_chunks(pair_image, size), desc='re-rank', disable=not progress):
        lengths = [e - s for s, e in pieces]
        per_group = lengths[0]
        rows = torch.cat([torch.arange(s, e) for s, e in pieces]).to(device)
        texts = pair_text[rows]
        unique = pair_image[torch.tensor([s for s, _ in pieces], device=device)]
        if all(n == per_group for n in lengths):
            slot = None
        else:
            group = torch.repeat_interleave(torch.arange(len(pieces)), torch.tensor(lengths))
            first = torch.tensor([0] + lengths[:-1]).cumsum(0)
            slot = (group * per_group + torch.arange(rows.numel()) - first[group]).to(device)
        mask = feats.text_masks[texts]
        length = int(mask.sum(1).max()) if trim else mask.shape[1]
        # dropping all-padding columns is exact: padded keys get exp(-10000) = 0 weight, padded queries are unused
        cls = fuse_grouped(bert, feats.text_feats[texts, :length], mask[:, :length], feats.image_feats[unique],
                           slot, per_group)
        scores[rows] = model.itm_head(cls)[:, 1].float()
    return scores


@torch.no_grad()
def rerank_fast(model, feats, sims, k_test, score='itm', world_size=1, rank=0, pair_batch=None, trim=True,
                progress=False, chunk_bytes=None):
    """Same matrices as `rerank_reference`; each unique pair once, each image's K/V once per chunk and layer.

    Chunks: automatic (`chunk_size`), at most `pair_batch` pairs when given; `chunk_bytes` overrides the
    per-device activation budget of the automatic rule.
    """
    _check_rule(score)
    pair_image, pair_text, (s, e, i2t_top), i2t_pair, (s2, e2, t2i_top), t2i_pair = \
        candidate_pairs(sims, k_test, world_size, rank)
    logits = score_pairs(model, feats, pair_image, pair_text, pair_batch, trim, progress, chunk_bytes)
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
    return utils.all_reduce_sum(scores)


@torch.no_grad()
def evaluate_retrieval(model, image_loader, tokenizer, device, k_test, score='itm', method='fast', pair_batch=None,
                       progress=True):
    """Score matrices (i2t [Ni, Nt], t2i [Nt, Ni], numpy) of the official two-stage protocol on a re_eval loader.

    `pair_batch` (config `rerank_batch`): None for automatic chunks, else an upper bound on pairs per chunk.
    """
    was_training = model.training
    model.eval()
    dataset = image_loader.dataset
    feats = extract_features(model, image_loader, dataset.text, tokenizer, device)
    sims = (feats.image_embeds @ feats.text_embeds.t()).float()
    world_size, rank = utils.get_world_size(), utils.get_rank()
    progress = progress and rank == 0
    if method == 'fast' and fuses_from_ids(model):
        method = 'reference'  # the fast re-ranker reuses text-mode states, which a pass from token ids does not read
    if method == 'fast':
        i2t, t2i = rerank_fast(model, feats, sims, k_test, score, world_size, rank, pair_batch, progress=progress)
    elif method == 'reference':
        i2t, t2i = rerank_reference(model, feats, sims, k_test, score, world_size, rank, progress=progress)
    else:
        raise ValueError(f"re-ranking method must be 'fast' or 'reference', got {method!r}")
    i2t, t2i = gather_rows(i2t), gather_rows(t2i)
    model.train(was_training)
    return i2t.cpu().numpy(), t2i.cpu().numpy()
