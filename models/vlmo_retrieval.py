"""VLMo retrieval through Retrieval.py (registered in models/registry.py): the fine-tuning step and the official
dual-encoder evaluation (docs/README_vlmo.md, "Fine-tuning").

Training (VLMo.md §7.1): ITC over features gathered from every rank (`compute_irtr`; no temperature clamp, local
block first, no gradient through remote blocks). The batch's `idx` is not read: duplicates of an image inside a batch
are negatives, as in the official code (ALBEF treats them as positives).

Evaluation (VLMo.md §14.1): every test image through the image-only pass and every caption through the text-only
pass, the normalised `cls_feats` compared by dot product: the score matrix itself, with no re-ranking and no k_test.
The script's recall computation (`evaluation.retrieval.itm_eval`) reads it like ALBEF's re-ranked matrices.

`retrieval.mode: dual_rerank` is the supplement's variant (§14.1 item 5; the official routine exists but no released
config calls it): the retrieval model keeps an ITM head (`itm_score`, loaded from stage 3), fine-tuning adds ITM with
hard negatives (× `loss_weights.itm`) to ITC, and evaluation re-ranks the dual encoder's top-`k_test` candidates of
every image row and every text column by a fused pass: score = `itm_score[:, 1]` + dual score for a candidate,
−100 + dual score otherwise.
"""
import torch
import torch.distributed as dist

RETRIEVAL_MODES = ('dual', 'dual_rerank')


def retrieval_mode(config):
    """`retrieval.mode`: dual (default, official) or dual_rerank."""
    mode = (config.get('retrieval') or {}).get('mode', 'dual')
    if mode not in RETRIEVAL_MODES:
        raise ValueError(f'retrieval.mode: {mode!r} is not a VLMo retrieval mode; use one of '
                         f'{", ".join(RETRIEVAL_MODES)}')
    return mode


def retrieval_step(model, batch, alpha):
    """One fine-tuning step on an (image, text, idx) batch of the shared pipeline: {'loss_itc': ITC} (dual_rerank:
    and 'loss_itm')."""
    image, text, _ = batch
    out = model(image, text)  # through forward, so DDP's gradient reduction runs
    if isinstance(out, tuple):  # dual_rerank: (ITC, ITM)
        return {'loss_itc': out[0], 'loss_itm': out[1]}
    return {'loss_itc': out}


def make_retrieval_step(config, device):
    """TaskSpec.make_step: checks the retrieval mode once, then `retrieval_step`."""
    retrieval_mode(config)
    return retrieval_step


def tokenize_texts(model, texts, tokenizer, batch_size=256):
    """Fixed-length `[CLS] … [SEP]` ids and masks [N_txt, max_text_len] of `texts` (CPU)."""
    ids, masks = [], []
    for start in range(0, len(texts), batch_size):
        tok = tokenizer(list(texts[start:start + batch_size]), padding='longest', truncation=True,
                        max_length=model.max_text_len, return_tensors='pt')
        i, m = model.fixed_length(tok)
        ids.append(i)
        masks.append(m)
    return torch.cat(ids), torch.cat(masks)


@torch.no_grad()
def encode_texts(model, ids, masks, device, batch_size=32):
    """Normalised text-only `cls_feats` [N_txt, D] of fixed-length ids."""
    return torch.cat([model.infer_text(ids[s:s + batch_size].to(device), masks[s:s + batch_size].to(device))
                      ['cls_feats'].float() for s in range(0, len(ids), batch_size)])


@torch.no_grad()
def encode_images(model, loader, device):
    """Normalised image-only `cls_feats` [N_img, D], in the loader's order (it must not shuffle)."""
    return torch.cat([model.infer_image(image.to(device, non_blocking=True))['cls_feats'].float()
                      for image, _ in loader])


def candidates(scores, k):
    """Boolean masks of the dual encoder's top-k: (texts of every image row [N_img, N_txt], images of every text
    column [N_txt, N_img])."""
    i2t = torch.zeros_like(scores, dtype=torch.bool)
    i2t.scatter_(1, scores.topk(min(k, scores.shape[1]), dim=1).indices, True)
    t2i = torch.zeros_like(scores.t(), dtype=torch.bool)
    t2i.scatter_(1, scores.t().topk(min(k, scores.shape[0]), dim=1).indices, True)
    return i2t, t2i


def rerank(scores, itm, i2t_candidates, t2i_candidates):
    """The supplement's re-ranked matrices: ITM logit + dual score on candidates, −100 + dual score elsewhere.
    `itm` [N_img, N_txt] holds the ITM logit of every candidate pair (either direction); returns (i2t, t2i)."""
    i2t = scores + torch.where(i2t_candidates, itm, torch.full_like(itm, -100.0))
    t2i = scores.t() + torch.where(t2i_candidates, itm.t(), torch.full_like(itm.t(), -100.0))
    return i2t, t2i


@torch.no_grad()
def itm_logits(model, dataset, ids, masks, pairs, device, batch_size=32):
    """ITM logits `itm_score(fused cls)[:, 1]` [N_img, N_txt] of the pairs marked in `pairs` (others 0). Each picture
    is read once (dataset[i] = (image, index)); with several processes every rank takes every W-th picture and the
    matrices are summed across ranks."""
    out = torch.zeros(pairs.shape, dtype=torch.float32)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    for i in range(rank, pairs.shape[0], world):
        texts = pairs[i].nonzero().flatten()
        if len(texts) == 0:
            continue
        image = dataset[i][0].unsqueeze(0).to(device)
        for s in range(0, len(texts), batch_size):
            t = texts[s:s + batch_size]
            fused = model.infer(ids[t].to(device), masks[t].to(device), image.expand(len(t), -1, -1, -1))
            out[i, t] = model.itm_score(fused['cls_feats'])[:, 1].float().cpu()
    if world > 1:
        out = out.to(device)
        dist.all_reduce(out)
        out = out.cpu()
    return out


@torch.no_grad()
def dual_encoder_scores(model, loader, tokenizer, device, config):
    """TaskSpec.evaluate for retrieval: (i2t [N_img, N_txt], t2i [N_txt, N_img]) numpy score matrices of the dual
    encoder on a re_eval loader. Every rank computes the whole matrix (official). With `retrieval.mode:
    dual_rerank` the dual encoder's top-`k_test` (default 32) of each row and column are re-ranked (module doc)."""
    mode = retrieval_mode(config)
    was_training = model.training
    model.eval()
    batch = int(config.get('batch_size_test') or 32)
    ids, masks = tokenize_texts(model, loader.dataset.text, tokenizer)
    texts = encode_texts(model, ids, masks, device, batch)
    images = encode_images(model, loader, device)
    scores = (images @ texts.t()).cpu()
    if mode == 'dual_rerank':
        if not hasattr(model, 'itm_score'):
            raise ValueError('retrieval.mode: dual_rerank needs the retrieval model built with that mode (it keeps '
                             'the ITM head); build it from the same config')
        i2t_cand, t2i_cand = candidates(scores, int(config.get('k_test') or 32))
        itm = itm_logits(model, loader.dataset, ids, masks, i2t_cand | t2i_cand.t(), device, batch)
        i2t, t2i = rerank(scores, itm, i2t_cand, t2i_cand)
    else:
        i2t, t2i = scores, scores.t()
    model.train(was_training)
    return i2t.numpy(), t2i.numpy()
