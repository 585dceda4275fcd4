"""Image-text retrieval evaluation: feature extraction, ITC similarities and the official recall metrics.

The ITM re-ranking on top of these features lives beside this module; this part is shared by the zero-shot
check during pretraining and by Retrieval.py.
"""
import numpy as np
import torch
import torch.nn.functional as F


def text_backbone(model):
    """The BertModel of a task model (pretraining wraps it as `text_encoder.bert`)."""
    return getattr(model.text_encoder, 'bert', model.text_encoder)


@torch.no_grad()
def extract_text_features(model, texts, tokenizer, device, batch_size=256, max_length=30, with_ids=False):
    """Text-mode states [Nt, 30, D], masks and normalised ITC embeddings of every caption (padded to 30); with
    `with_ids`, also the token ids [Nt, 30] (for a model whose fusion pass reads them)."""
    bert = text_backbone(model)
    feats, masks, embeds, all_ids = [], [], [], []
    for start in range(0, len(texts), batch_size):
        tok = tokenizer(texts[start:start + batch_size], padding='max_length', truncation=True,
                        max_length=max_length, return_tensors='pt')
        ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
        out = bert(ids, attention_mask=mask, return_dict=True, mode='text').last_hidden_state
        feats.append(out)
        masks.append(mask)
        all_ids.append(ids)
        embeds.append(F.normalize(model.text_proj(out[:, 0, :]).float(), dim=-1))
    result = (torch.cat(feats), torch.cat(masks), torch.cat(embeds))
    return result + (torch.cat(all_ids),) if with_ids else result


@torch.no_grad()
def extract_image_features(model, loader, device):
    """ViT tokens [Ni, N, D] and normalised ITC embeddings, in dataset order (loader must not shuffle)."""
    feats, embeds = [], []
    for image, _ in loader:
        out = model.visual_encoder(image.to(device, non_blocking=True))
        feats.append(out)
        embeds.append(F.normalize(model.vision_proj(out[:, 0, :]).float(), dim=-1))
    return torch.cat(feats), torch.cat(embeds)


def ranks_from_scores(scores_i2t, scores_t2i, img2txt, txt2img):
    """0-based rank of the best ground-truth caption per image and of the ground-truth image per text."""
    scores_i2t = np.asarray(scores_i2t)
    scores_t2i = np.asarray(scores_t2i)
    tr = np.zeros(scores_i2t.shape[0])
    for i, row in enumerate(scores_i2t):
        order = np.argsort(row)[::-1]
        tr[i] = min(np.where(order == t)[0][0] for t in img2txt[i])
    ir = np.zeros(scores_t2i.shape[0])
    for t, row in enumerate(scores_t2i):
        order = np.argsort(row)[::-1]
        ir[t] = np.where(order == txt2img[t])[0][0]
    return tr, ir


def itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """The official metrics dict: txt_r1/5/10, txt_r_mean, img_r1/5/10, img_r_mean, r_mean (percentages)."""
    tr, ir = ranks_from_scores(scores_i2t, scores_t2i, img2txt, txt2img)
    tr1, tr5, tr10 = (100.0 * np.mean(tr < k) for k in (1, 5, 10))
    ir1, ir5, ir10 = (100.0 * np.mean(ir < k) for k in (1, 5, 10))
    tr_mean, ir_mean = (tr1 + tr5 + tr10) / 3, (ir1 + ir5 + ir10) / 3
    return {'txt_r1': tr1, 'txt_r5': tr5, 'txt_r10': tr10, 'txt_r_mean': tr_mean,
            'img_r1': ir1, 'img_r5': ir5, 'img_r10': ir10, 'img_r_mean': ir_mean, 'r_mean': (tr_mean + ir_mean) / 2}


@torch.no_grad()
def itc_retrieval(model, image_loader, tokenizer, device):
    """Zero-shot ITC-only retrieval metrics on a re_eval dataset loader (no ITM re-ranking)."""
    was_training = model.training
    model.eval()
    dataset = image_loader.dataset
    _, _, text_embeds = extract_text_features(model, dataset.text, tokenizer, device)
    _, image_embeds = extract_image_features(model, image_loader, device)
    sims = (image_embeds @ text_embeds.t()).cpu().numpy()
    model.train(was_training)
    return itm_eval(sims, sims.T, dataset.txt2img, dataset.img2txt)
