"""Weakly-supervised grounding evaluation: Grad-CAM maps and detector-proposal scoring.

`gradcam_itm` (default; a cross-attention layer of the fusion encoder, official block 8) and `gradcam_itc` (a ViT
self-attention block) turn (image, text) batches into [B, g, g] maps; `grounding_accuracy` upsamples each map to its
image, scores every proposal by sum(map inside box) / (w*h)^0.5, picks the best and counts IoU >= 0.5 per split.
"""
import math
from collections import Counter

import torch
import torch.nn.functional as F

from evaluation.refer import SPLITS
from evaluation.retrieval import text_backbone

ALPHA = 0.5  # area exponent of the official box score


# ---- Grad-CAM ----------------------------------------------------------------------------------------------------
def cross_attention_of(model, block_num):
    """The BertSelfAttention of cross-attention layer `block_num` (a clear error for a text-only layer)."""
    bert = text_backbone(model)
    # ALBEF: the fusion layers; a shared stream (SIMLA): every layer has its cross-attention in multimodal mode
    fusion, total = bert.encoder.layer_range('multimodal' if bert.encoder.shared_stream else 'fusion')
    if not fusion <= block_num < total:
        raise ValueError(f'itm Grad-CAM needs a cross-attention layer: block_num must be in [{fusion}, {total}) '
                         f'for this text encoder (fusion_layer {fusion}); got {block_num}. The official default 8 is '
                         f'the 3rd cross-attention layer of BERT-base; for other sizes pass --block_num '
                         f'{min(fusion + 2, total - 1)}')
    return bert.encoder.layer[block_num].crossattention.self


def _grid(num_tokens):
    side = int(round(math.sqrt(num_tokens)))
    if side * side != num_tokens:
        raise ValueError(f'{num_tokens} image patches do not form a square grid')
    return side


def gradcam_itm(model, image, text, block_num):
    """Per-token ITM Grad-CAM [B, L, g, g] of one cross-attention layer; the sentence map is its mean over dim 1.

    Official recipe: d itm_head(CLS)[:, 1].sum() / d attention probabilities, clamped at 0, times the probabilities,
    image-CLS column dropped, padded tokens zeroed (but still counted by the mean), mean over heads.
    """
    attn = cross_attention_of(model, block_num)
    attn.save_attention = True
    try:
        with torch.enable_grad():
            image_embeds = model.visual_encoder(image)
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
            out = model.text_encoder(text.input_ids, attention_mask=text.attention_mask,
                                     encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                                     return_dict=True)
            logits = model.itm_head(out.last_hidden_state[:, 0, :])
            model.zero_grad()
            logits[:, 1].sum().backward()
        cams, grads = attn.get_attention_map().detach(), attn.get_attn_gradients().detach()
    finally:
        attn.save_attention = False
        attn.attention_map = attn.attn_gradients = None
        model.zero_grad(set_to_none=True)
    B, heads, L, N = cams.shape
    g = _grid(N - 1)
    mask = text.attention_mask.view(B, 1, L, 1, 1).to(cams.dtype)
    cams = cams[:, :, :, 1:].reshape(B, heads, L, g, g) * mask
    grads = grads[:, :, :, 1:].clamp(min=0).reshape(B, heads, L, g, g) * mask
    return (cams * grads).mean(1)


def gradcam_itc(model, image, text, block_num):
    """ITC Grad-CAM [B, g, g] of ViT block `block_num`: CLS-query attention row times its clamped gradient."""
    depth = len(model.visual_encoder.blocks)
    if not 0 <= block_num < depth:
        raise ValueError(f'itc Grad-CAM reads a ViT block: block_num must be in [0, {depth}), got {block_num}; '
                         f'pass --block_num {depth - 1} for the last block')
    attn = model.visual_encoder.blocks[block_num].attn
    try:
        with torch.enable_grad():
            image_embeds = model.visual_encoder(image, register_blk=block_num)
            image_feat = F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)
            text_embeds = model.text_encoder(text.input_ids, attention_mask=text.attention_mask, return_dict=True,
                                             mode='text').last_hidden_state
            text_feat = F.normalize(model.text_proj(text_embeds[:, 0, :]), dim=-1)
            sim = image_feat @ text_feat.t() / model.temp
            model.zero_grad()
            sim.diag().sum().backward()
        cam, grad = attn.get_attention_map().detach(), attn.get_attn_gradients().detach()
    finally:
        attn.attention_map = attn.attn_gradients = None
        model.zero_grad(set_to_none=True)
    B, N = cam.shape[0], cam.shape[-1]
    g = _grid(N - 1)
    cam = cam[:, :, 0, 1:].reshape(B, -1, g, g)
    grad = grad[:, :, 0, 1:].reshape(B, -1, g, g).clamp(0)
    return (cam * grad).mean(1)


def sentence_gradcam(model, image, text, mode='itm', block_num=8):
    """[B, g, g] sentence-level Grad-CAM in `mode` 'itm' (token mean) or 'itc'."""
    if mode == 'itm':
        return gradcam_itm(model, image, text, block_num).mean(1)
    if mode == 'itc':
        return gradcam_itc(model, image, text, block_num)
    raise ValueError(f"gradcam_mode must be 'itm' or 'itc', got {mode!r}")


def compute_gradcams(model, loader, device, mode='itm', block_num=8):
    """[{'ref_id', 'pred': [g, g] CPU map}] for every (image, text, ref_id) batch of a grounding test loader."""
    was_training = model.training
    model.eval()
    results = []
    for image, text, ref_ids in loader:
        image, text = image.to(device, non_blocking=True), text.to(device)
        cams = sentence_gradcam(model, image, text, mode, block_num)
        results += [{'ref_id': int(r), 'pred': cam.float().cpu()} for r, cam in zip(ref_ids, cams)]
    model.train(was_training)
    return results


# ---- box scoring and the metric ----------------------------------------------------------------------------------
def upsample_map(cam, height, width):
    """[g, g] map -> [height, width] (bicubic, align_corners False), as the official evaluation."""
    return F.interpolate(cam.view(1, 1, *cam.shape[-2:]).float(), size=(int(height), int(width)), mode='bicubic',
                         align_corners=False).squeeze()


def box_score(cam_full, box, alpha=ALPHA):
    """sum(cam[int(y):int(y+h), int(x):int(x+w)]) / (w*h)^alpha (end-exclusive slices, truncation by int)."""
    x, y, w, h = box[:4]
    area = w * h
    if area <= 0:
        return float('nan')
    return float(cam_full[int(y):int(y + h), int(x):int(x + w)].sum()) / area ** alpha


def select_box(scores):
    """(index, fallback): the first highest score strictly above 0; if none, the plain argmax (first on ties).

    The official loop keeps a running maximum initialised at 0, so without a positive score it reuses the box of
    the previous item (or crashes on the first); the fallback replaces that.
    """
    best, best_score = None, 0.0
    for i, score in enumerate(scores):
        if score > best_score:
            best, best_score = i, score
    if best is not None:
        return best, False
    finite = [(s, -i) for i, s in enumerate(scores) if not math.isnan(s)]
    return (-max(finite)[1] if finite else 0), True


def inclusive_iou(box_a, box_b):
    """IoU of [x, y, w, h] boxes, pixels inclusive (x2 = x + w - 1), strict overlap test."""
    ax, ay, aw, ah = box_a[:4]
    bx, by, bw, bh = box_b[:4]
    ix1, iy1 = max(ax, bx), max(ay, by)
    ix2, iy2 = min(ax + aw - 1, bx + bw - 1), min(ay + ah - 1, by + bh - 1)
    inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if ix1 < ix2 and iy1 < iy2 else 0
    return float(inter) / (aw * ah + bw * bh - inter)


def predict_box(cam, image_record, proposals, alpha=ALPHA):
    """(box, fallback) chosen among `proposals` for a [g, g] map of an image of the record's height/width."""
    if not proposals:
        raise ValueError(f'image {image_record.get("id")} has no detector proposals in det_file')
    cam_full = upsample_map(cam, image_record['height'], image_record['width'])
    index, fallback = select_box([box_score(cam_full, box, alpha) for box in proposals])
    return proposals[index][:4], fallback


def grounding_accuracy(results, refer, dets, alpha=ALPHA):
    """Accuracy per split present ('val_d', 'testA_d', 'testB_d'; 'train_d' for train refs) and the fallback count."""
    correct, total, fallbacks = Counter(), Counter(), 0
    for res in results:
        ref_id = res['ref_id']
        box, fallback = predict_box(res['pred'], refer.image(ref_id), dets[refer.image_id(ref_id)], alpha)
        fallbacks += fallback
        split = refer.split(ref_id)
        total[split] += 1
        correct[split] += inclusive_iou(refer.box(ref_id), box) >= 0.5
    metrics = {f'{split}_d': correct[split] / total[split] for split in SPLITS if total[split]}
    metrics['no_positive_score'] = fallbacks
    metrics.update({f'n_{split}': total[split] for split in SPLITS if total[split]})
    return metrics


def random_proposal_accuracy(ref_ids, refer, dets):
    """Expected accuracy per split of picking one proposal uniformly at random (the chance level to beat)."""
    hits, total = Counter(), Counter()
    for ref_id in ref_ids:
        proposals = dets[refer.image_id(ref_id)]
        gt = refer.box(ref_id)
        split = refer.split(ref_id)
        hits[split] += sum(inclusive_iou(gt, p) >= 0.5 for p in proposals) / len(proposals)
        total[split] += 1
    return {f'{split}_d': hits[split] / total[split] for split in total}
