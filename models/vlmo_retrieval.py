"""VLMo retrieval through Retrieval.py (registered in models/registry.py): the fine-tuning step and the official
dual-encoder evaluation (docs/README_vlmo.md, "Fine-tuning").

Training (VLMo.md §7.1): ITC over features gathered from every rank (`compute_irtr`; no temperature clamp, local
block first, no gradient through remote blocks). The batch's `idx` is not read: duplicates of an image inside a batch
are negatives, as in the official code (ALBEF treats them as positives).

Evaluation (VLMo.md §14.1): every test image through the image-only pass and every caption through the text-only
pass, the normalised `cls_feats` compared by dot product: the score matrix itself, with no re-ranking and no k_test.
The script's recall computation (`evaluation.retrieval.itm_eval`) reads it like ALBEF's re-ranked matrices.
"""
import torch

RETRIEVAL_MODES = ('dual',)


def retrieval_mode(config):
    """`retrieval.mode` (default dual); the re-ranking variant of the supplement needs an ITM-fine-tuned model
    that no released config trains, so it is refused with the reason."""
    mode = (config.get('retrieval') or {}).get('mode', 'dual')
    if mode not in RETRIEVAL_MODES:
        raise ValueError(f'retrieval.mode: {mode!r} is not available: the dual-encoder retrieval model has no ITM '
                         f'head to re-rank with (the re-ranking variant of the VLMo supplement is fine-tuned with ITC '
                         f'+ ITM, and no released config uses it); set retrieval.mode: dual')
    return mode


def retrieval_step(model, batch, alpha):
    """One fine-tuning step on an (image, text, idx) batch of the shared pipeline: {'loss_itc': ITC}."""
    image, text, _ = batch
    return {'loss_itc': model(image, text)}  # through forward, so DDP's gradient reduction runs


def make_retrieval_step(config, device):
    """TaskSpec.make_step: checks the retrieval mode once, then `retrieval_step`."""
    retrieval_mode(config)
    return retrieval_step


@torch.no_grad()
def encode_texts(model, texts, tokenizer, device, batch_size=32):
    """Normalised text-only `cls_feats` [N_txt, D] of `texts` (fixed-length `[CLS] … [SEP]`, max_text_len)."""
    feats = []
    for start in range(0, len(texts), batch_size):
        tok = tokenizer(list(texts[start:start + batch_size]), padding='longest', truncation=True,
                        max_length=model.max_text_len, return_tensors='pt')
        ids, mask = model.fixed_length(tok)
        feats.append(model.infer_text(ids.to(device), mask.to(device))['cls_feats'].float())
    return torch.cat(feats)


@torch.no_grad()
def encode_images(model, loader, device):
    """Normalised image-only `cls_feats` [N_img, D], in the loader's order (it must not shuffle)."""
    return torch.cat([model.infer_image(image.to(device, non_blocking=True))['cls_feats'].float()
                      for image, _ in loader])


@torch.no_grad()
def dual_encoder_scores(model, loader, tokenizer, device, config):
    """TaskSpec.evaluate for retrieval: (i2t [N_img, N_txt], t2i [N_txt, N_img]) numpy score matrices of the dual
    encoder on a re_eval loader. Every rank computes the whole matrix (official)."""
    retrieval_mode(config)
    was_training = model.training
    model.eval()
    batch = int(config.get('batch_size_test') or 32)
    texts = encode_texts(model, loader.dataset.text, tokenizer, device, batch)
    images = encode_images(model, loader, device)
    scores = images @ texts.t()
    model.train(was_training)
    return scores.cpu().numpy(), scores.t().cpu().numpy()
