"""Draw the Grad-CAM of a sentence on an image: one panel for the sentence-level map and one per word-piece.

    python -m evaluation.gradcam_picture --checkpoint refcoco.pth --config configs/Grounding.yaml \
        --image dog.jpg --text "the dog on the left" --out dog_gradcam.png [--mode itm|itc] [--block_num 8]

The sentence map is the official grounding map (token mean of the ITM cross-attention Grad-CAM); a word
panel uses that token's row alone, as the official visualisation notebook does. `--mode itc` (ViT self-attention)
has no per-word maps, so it draws the sentence panel only. Only PIL and numpy draw; nothing is downloaded.
"""
import argparse
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dataset import build_transform, pre_caption
from evaluation.grounding import gradcam_itc, gradcam_itm
from models.checkpoint import load_retrieval_checkpoint
from models.model_retrieval import ALBEF
from models.tokenization import build_tokenizer
from engine.config import load_config

PANEL = 224      # panel width in pixels
LABEL_HEIGHT = 22
COLUMNS = 4


def colormap(values):
    """Map [H, W] values in [0, 1] to an RGB uint8 'jet'-like ramp (blue -> cyan -> yellow -> red)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    stops = np.array([0.0, 0.35, 0.65, 1.0])
    colours = np.array([[0, 0, 140], [0, 200, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float64)
    rgb = np.stack([np.interp(v[..., 0], stops, colours[:, c]) for c in range(3)], axis=-1)
    return rgb.astype(np.uint8)


def overlay(image, cam, strength=0.55):
    """`image` (PIL RGB) with `cam` ([g, g] array) upsampled bicubically to its size, normalised and blended on top."""
    cam = np.asarray(cam, dtype=np.float32)
    span = float(cam.max() - cam.min())
    cam = (cam - cam.min()) / span if span > 0 else np.zeros_like(cam)
    heat = Image.fromarray(cam).resize(image.size, Image.BICUBIC)
    heat = colormap(np.asarray(heat))
    blended = (1 - strength) * np.asarray(image, dtype=np.float32) + strength * heat
    return Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))


def _fit_label(draw, text, font, width):
    """Shorten `text` with an ellipsis until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + '...', font=font) > width:
        text = text[:-1]
    return text + '...'


def render_panels(image, panels):
    """A grid picture of (label, PIL image) panels, PANEL pixels wide each, with the label under each panel."""
    width = PANEL
    height = max(1, round(image.height * PANEL / image.width))
    columns = min(COLUMNS, len(panels))
    rows = (len(panels) + columns - 1) // columns
    canvas = Image.new('RGB', (columns * width, rows * (height + LABEL_HEIGHT)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, (label, picture) in enumerate(panels):
        x, y = (i % columns) * width, (i // columns) * (height + LABEL_HEIGHT)
        canvas.paste(picture.resize((width, height), Image.BICUBIC), (x, y))
        draw.text((x + 4, y + height + 4), _fit_label(draw, label, font, width - 8), fill=(0, 0, 0), font=font)
    return canvas


def gradcam_picture(image, sentence, sentence_map, word_maps=()):
    """Panels: the image, the sentence-level map, then one map per (word, [g, g] map)."""
    image = image.convert('RGB')
    panels = [('image', image), (sentence, overlay(image, sentence_map))]
    panels += [(word, overlay(image, cam)) for word, cam in word_maps]
    return render_panels(image, panels)


def compute_maps(model, image_tensor, text, tokenizer, mode='itm', block_num=8):
    """(sentence map, [(word-piece, map)]) as numpy arrays for one image [1, 3, R, R] and one tokenised sentence."""
    model.eval()
    if mode == 'itc':
        return gradcam_itc(model, image_tensor, text, block_num)[0].cpu().numpy(), []
    token_maps = gradcam_itm(model, image_tensor, text, block_num)[0]  # [L, g, g]
    ids = text.input_ids[0].tolist()
    pieces = tokenizer.convert_ids_to_tokens(ids)
    words = [(piece, token_maps[t].cpu().numpy()) for t, piece in enumerate(pieces)
             if ids[t] not in (tokenizer.cls_token_id, tokenizer.pad_token_id)]
    return token_maps.mean(0).cpu().numpy(), words


def main(argv=None):
    p = argparse.ArgumentParser(description='Grad-CAM picture of a sentence on an image (ALBEF grounding model)')
    p.add_argument('--checkpoint', required=True, help='grounding/retrieval checkpoint (raw or training file)')
    p.add_argument('--config', required=True, help='the config the model was trained with (image_res, sizes)')
    p.add_argument('--image', required=True)
    p.add_argument('--text', required=True)
    p.add_argument('--out', required=True, help='PNG file to write')
    p.add_argument('--mode', choices=['itm', 'itc'], default=None, help='default: the config key gradcam_mode')
    p.add_argument('--block_num', type=int, default=None, help='default: the config key gradcam_block')
    p.add_argument('--text_encoder', default='bert-base-uncased', help='tokenizer vocabulary (local, offline)')
    p.add_argument('--device', default='cpu')
    args = p.parse_args(argv)

    config = load_config(args.config)
    mode = args.mode or config['gradcam_mode']
    block_num = args.block_num if args.block_num is not None else config['gradcam_block']
    device = torch.device(args.device)
    model = ALBEF(config=config, text_encoder=None, with_momentum=False)
    load_retrieval_checkpoint(model, args.checkpoint)
    model = model.to(device)
    tokenizer = build_tokenizer(args.text_encoder)
    picture = Image.open(args.image).convert('RGB')
    image_tensor = build_transform('test', config['image_res'])(picture).unsqueeze(0).to(device)
    sentence = pre_caption(args.text, 30)
    text = tokenizer([sentence], padding='longest', return_tensors='pt').to(device)
    sentence_map, word_maps = compute_maps(model, image_tensor, text, tokenizer, mode, block_num)
    if word_maps and not any(np.any(cam) for _, cam in word_maps):
        print(f'every word map is zero: block {block_num} is the last layer, where only the [CLS] row reaches the ITM '
              f'head; pass an earlier cross-attention layer with --block_num for per-word maps')
    canvas = gradcam_picture(picture, sentence, sentence_map, word_maps)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    canvas.save(args.out)
    print(f'wrote {args.out} ({canvas.width}x{canvas.height}, {mode} Grad-CAM, block {block_num}, '
          f'{len(word_maps)} word panels)')
    return args.out


if __name__ == '__main__':
    main()
