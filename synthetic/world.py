"""A deterministic synthetic image-text world written in the official ALBEF annotation formats.

`python -m synthetic.world --root data/synthetic [--seed 0] [--scale 1.0]` (`python -m synthetic` is the same) draws
small pictures of coloured shapes and writes pretraining, retrieval, VQA, NLVR2, SNLI-VE and RefCOCO+-style grounding
annotations that the official loaders read unchanged. Every picture lives in one flat folder, `<root>/images`, and every image reference in every
file is relative to `<root>` ("images/train_000123.jpg"; VE ids are the same without ".jpg"), so every image root of
every config (image_root, vqa_root, vg_root) is `<root>`, and refcoco_data is `<root>` too.
The picture fully determines every text; the same seed and scale give the same bytes."""

from __future__ import annotations

import argparse
import itertools
import json
import pickle
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

FORMAT_VERSION = 2  # 2: NLVR2 statements drawn apart from their pictures (their text no longer predicts the label)
IMAGE_DIR = "images"
REFCOCO_DIR = "refcoco+"
CAPTION_IMAGE_SIZE = (96, 96)  # (width, height)
# Non-square sizes make any height/width swap in grounding evaluation visible.
GROUNDING_IMAGE_SIZES = ((160, 160), (192, 160), (160, 192))
JPEG_QUALITY = 95

COLOURS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 35),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "purple": (135, 55, 175),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOUR_NAMES = tuple(COLOURS)
KINDS = ("circle", "square", "triangle", "diamond", "star", "cross")
SIZES = ("small", "large")
# Share of a grid cell's shorter side that a shape spans; the gap between the ranges keeps the two sizes distinct.
SIZE_FRACTIONS = {"small": (0.42, 0.52), "large": (0.78, 0.92)}
POSITION_PHRASES = {
    (0, 0): "at the top left",
    (0, 1): "at the top",
    (0, 2): "at the top right",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "at the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "at the bottom right",
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")

BASE_COUNTS = {
    "train_images": 3000,
    "val_images": 150,
    "test_images": 150,
    "retrieval_train_images": 1000,
    "vqa_train_questions": 3000,
    "vg_train_questions": 600,
    "nlvr_train": 2000,
    "nlvr_dev": 300,
    "nlvr_test": 300,
    "ve_train_images": 1000,
    "ve_dev_images": 100,
    "ve_test_images": 100,
    "grounding_train_images": 600,
    "grounding_val_images": 80,
    "grounding_testA_images": 60,
    "grounding_testB_images": 60,
}
MIN_COUNT = 6
RETRIEVAL_TRAIN_CAPTIONS = 3
RETRIEVAL_EVAL_CAPTIONS = (3, 5)
PRETRAIN_LIST_PROBABILITY = 0.25
VQA_VAL_PER_IMAGE = 3
VQA_TEST_PER_IMAGE = 4

# Independent random streams, so that changing one task's text generator leaves every other output unchanged.
STREAMS = (
    "train_pool",
    "val_pool",
    "test_pool",
    "ve_pool",
    "grounding_pool",
    "pretrain",
    "retrieval",
    "vqa",
    "nlvr",
    "ve",
    "grounding_text",
    "dets",
)


# ---------------------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class Shape:
    """One shape: attributes, 3x3 grid cell, and (once drawn) its painted-pixel box [x, y, w, h] and area."""

    colour: str
    kind: str
    size: str
    row: int
    col: int
    bbox: tuple = (0, 0, 0, 0)
    area: int = 0


@dataclass(frozen=True)
class Scene:
    """One picture: file stem, size in pixels and its shapes."""

    name: str
    width: int
    height: int
    shapes: tuple

    @property
    def file_name(self) -> str:
        """Image file name inside the image folder (COCO's `file_name`)."""
        return f"{self.name}.jpg"

    @property
    def path(self) -> str:
        """Image path relative to the world's root, as every annotation file writes it."""
        return f"{IMAGE_DIR}/{self.name}.jpg"

    @property
    def ve_id(self) -> str:
        """SNLI-VE image id: the path relative to the root without '.jpg' (the loader appends it)."""
        return f"{IMAGE_DIR}/{self.name}"


def _pick(rng: np.random.Generator, options: Sequence):
    """Uniform choice that keeps the element's Python type (numpy would return numpy scalars)."""
    return options[int(rng.integers(len(options)))]


def _pick_weighted(rng: np.random.Generator, options: Sequence, weights: Sequence[float]):
    """Weighted choice keeping the element's Python type."""
    probabilities = np.asarray(weights, dtype=float)
    return options[int(rng.choice(len(options), p=probabilities / probabilities.sum()))]


def _shuffled(rng: np.random.Generator, items: Sequence) -> list:
    """A new list holding `items` in random order."""
    return [items[int(i)] for i in rng.permutation(len(items))]


def _chance(rng: np.random.Generator, probability: float) -> bool:
    """True with the given probability."""
    return bool(rng.random() < probability)


def _sample_caption_layout(rng: np.random.Generator, name: str) -> Scene:
    """1-3 shapes in distinct grid cells with distinct (colour, kind) pairs, so captions never need plurals."""
    count = _pick_weighted(rng, (1, 2, 3), (0.3, 0.4, 0.3))
    cells = rng.choice(9, size=count, replace=False)
    pairs = [(c, k) for c in COLOUR_NAMES for k in KINDS]
    chosen = rng.choice(len(pairs), size=count, replace=False)
    shapes = tuple(
        Shape(pairs[int(p)][0], pairs[int(p)][1], _pick(rng, SIZES), int(cell) // 3, int(cell) % 3)
        for p, cell in zip(chosen, cells)
    )
    width, height = CAPTION_IMAGE_SIZE
    return Scene(name, width, height, shapes)


def _sample_grounding_layout(rng: np.random.Generator, name: str) -> Scene:
    """2-4 shapes that often share a colour or a kind, redrawn until every shape has an identifying expression."""
    width, height = _pick(rng, GROUNDING_IMAGE_SIZES)
    while True:
        count = int(rng.integers(2, 5))
        shapes: list[Shape] = []
        for cell in rng.choice(9, size=count, replace=False):
            colour, kind = _pick(rng, COLOUR_NAMES), _pick(rng, KINDS)
            # Shared attributes make expressions such as "the red circle" or "the small square" necessary.
            if shapes and _chance(rng, 0.6):
                model = _pick(rng, shapes)
                colour, kind = (model.colour, kind) if _chance(rng, 0.5) else (colour, model.kind)
            shapes.append(Shape(colour, kind, _pick(rng, SIZES), int(cell) // 3, int(cell) % 3))
        scene = Scene(name, width, height, tuple(shapes))
        if all(identifying_descriptors(scene.shapes, i) for i in range(count)):
            return scene


def _scene_signature(scene: Scene) -> tuple:
    """The (colour, kind) content a caption names; equal signatures would make retrieval ground truth ambiguous."""
    return tuple(sorted((s.colour, s.kind) for s in scene.shapes))


# ---------------------------------------------------------------------------------------------------------------
# Drawing


def _draw_box(rng: np.random.Generator, shape: Shape, width: int, height: int) -> tuple:
    """Random inclusive square (x0, y0, x1, y1) for the shape, kept one pixel inside its grid cell."""
    cell_w, cell_h = width / 3, height / 3
    low, high = SIZE_FRACTIONS[shape.size]
    extent = int(round(min(cell_w, cell_h) * rng.uniform(low, high)))
    x_low = int(np.ceil(shape.col * cell_w)) + 1
    x_high = int(np.floor((shape.col + 1) * cell_w)) - 1 - extent
    y_low = int(np.ceil(shape.row * cell_h)) + 1
    y_high = int(np.floor((shape.row + 1) * cell_h)) - 1 - extent
    x0 = int(rng.integers(x_low, x_high + 1))
    y0 = int(rng.integers(y_low, y_high + 1))
    return x0, y0, x0 + extent - 1, y0 + extent - 1


def _star_points(x0: int, y0: int, x1: int, y1: int) -> list:
    """Five-pointed star, shifted down so its points span the box vertically."""
    radius = (x1 - x0) / 2
    # The lower points of a star reach only cos(36 deg) of the radius below the centre.
    cx, cy = (x0 + x1) / 2, y0 + radius
    cy += radius * (1 - np.cos(np.pi / 5)) / 2
    points = []
    for i in range(10):
        angle = -np.pi / 2 + i * np.pi / 5
        r = radius if i % 2 == 0 else 0.45 * radius
        points.append((cx + r * np.cos(angle), cy + r * np.sin(angle)))
    return points


def _cross_points(x0: int, y0: int, x1: int, y1: int) -> list:
    """Plus sign whose arms are a third of the box wide."""
    a, b = x0 + (x1 - x0) / 3, x0 + 2 * (x1 - x0) / 3
    c, d = y0 + (y1 - y0) / 3, y0 + 2 * (y1 - y0) / 3
    return [(a, y0), (b, y0), (b, c), (x1, c), (x1, d), (b, d), (b, y1), (a, y1), (a, d), (x0, d), (x0, c), (a, c)]


def _shape_mask(kind: str, box: tuple, width: int, height: int) -> np.ndarray:
    """Boolean [height, width] mask of the painted pixels of one shape."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if kind == "circle":
        draw.ellipse(box, fill=255)
    elif kind == "square":
        draw.rectangle(box, fill=255)
    elif kind == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    elif kind == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    elif kind == "star":
        draw.polygon(_star_points(*box), fill=255)
    elif kind == "cross":
        draw.polygon(_cross_points(*box), fill=255)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; expected one of {KINDS}")
    return np.asarray(canvas) > 0


def _mask_bbox(mask: np.ndarray) -> tuple:
    """[x, y, w, h] of the painted pixels, inclusive-pixel convention (w = x_last - x_first + 1)."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return (x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Mid-grey canvas (black and white shapes both stand out), half of them with light noise."""
    level = float(rng.integers(100, 161))
    canvas = np.full((height, width, 3), level)
    if _chance(rng, 0.5):
        canvas = canvas + rng.normal(0.0, rng.uniform(2.0, 7.0), size=canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def _paint_colour(rng: np.random.Generator, colour: str) -> np.ndarray:
    """The named colour with a small per-shape jitter."""
    base = np.asarray(COLOURS[colour], dtype=int)
    return np.clip(base + rng.integers(-12, 13, size=3), 0, 255).astype(np.uint8)


def _render(rng: np.random.Generator, layout: Scene) -> tuple:
    """Draw a layout; returns the RGB array and the scene with exact boxes and areas filled in."""
    canvas = _background(rng, layout.width, layout.height)
    placed = []
    for shape in layout.shapes:
        mask = _shape_mask(shape.kind, _draw_box(rng, shape, layout.width, layout.height), layout.width, layout.height)
        canvas[mask] = _paint_colour(rng, shape.colour)
        placed.append(replace(shape, bbox=_mask_bbox(mask), area=int(mask.sum())))
    return canvas, replace(layout, shapes=tuple(placed))


def _draw_pool(
    rng: np.random.Generator, image_dir: Path, prefix: str, count: int, sampler: Callable, unique: bool = False
) -> list:
    """Sample, draw and save `count` scenes named `<prefix>_<index>`; `unique` forbids repeated caption content."""
    scenes, seen = [], set()
    while len(scenes) < count:
        layout = sampler(rng, f"{prefix}_{len(scenes):06d}")
        if unique and _scene_signature(layout) in seen:
            continue
        seen.add(_scene_signature(layout))
        pixels, scene = _render(rng, layout)
        Image.fromarray(pixels).save(image_dir / scene.file_name, quality=JPEG_QUALITY, subsampling=0)
        scenes.append(scene)
    return scenes


# ---------------------------------------------------------------------------------------------------------------
# Phrases shared by every task


def _with_article(phrase: str) -> str:
    """'a' or 'an' + phrase."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join_and(parts: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _shape_count_phrase(count: int) -> str:
    """'one shape', 'two shapes'."""
    return f"{NUMBER_WORDS[count]} shape" + ("" if count == 1 else "s")


def _noun_phrase(rng: np.random.Generator, shape: Shape, size_probability: float = 0.35) -> str:
    """'red circle' or, sometimes, 'large red circle'."""
    words = [shape.size] if _chance(rng, size_probability) else []
    return " ".join(words + [shape.colour, shape.kind])


def _stylise(rng: np.random.Generator, text: str, probability: float = 0.3) -> str:
    """Sometimes write the sentence with a capital and a full stop, as people do (cleaning removes both)."""
    if _chance(rng, probability):
        return text[0].upper() + text[1:] + ("" if text.endswith("?") else ".")
    return text


def _absent_pair(rng: np.random.Generator, scene: Scene) -> tuple:
    """A (colour, kind) pair absent from the scene, usually sharing one attribute with a present shape."""
    present = {(s.colour, s.kind) for s in scene.shapes}
    while True:
        if _chance(rng, 0.7):
            model = _pick(rng, scene.shapes)
            pair = (model.colour, _pick(rng, KINDS)) if _chance(rng, 0.5) else (_pick(rng, COLOUR_NAMES), model.kind)
        else:
            pair = (_pick(rng, COLOUR_NAMES), _pick(rng, KINDS))
        if pair not in present:
            return pair


def _vertical_pairs(scene: Scene) -> list:
    """(upper, lower) pairs of shapes in different rows; vertical relations survive horizontal flips."""
    return [(a, b) for a in scene.shapes for b in scene.shapes if a.row < b.row]


def _unique_kind_shapes(scene: Scene) -> list:
    """Shapes whose kind occurs once, so 'the circle' names exactly one shape."""
    counts = Counter(s.kind for s in scene.shapes)
    return [s for s in scene.shapes if counts[s.kind] == 1]


def _unique_colour_shapes(scene: Scene) -> list:
    """Shapes whose colour occurs once, so 'the red object' names exactly one shape."""
    counts = Counter(s.colour for s in scene.shapes)
    return [s for s in scene.shapes if counts[s.colour] == 1]


# ---------------------------------------------------------------------------------------------------------------
# Captions (pretraining, retrieval)


def _caption_listing(rng: np.random.Generator, scene: Scene) -> str:
    """'there is a red circle and a small blue square'."""
    phrases = [_with_article(_noun_phrase(rng, s)) for s in _shuffled(rng, scene.shapes)]
    prefix = _pick(rng, ("", "", "a picture of ", "an image of ", "a drawing of ", "there is "))
    return prefix + _join_and(phrases)


def _caption_counted(rng: np.random.Generator, scene: Scene) -> str:
    """'two shapes: a red circle and a blue square'."""
    if len(scene.shapes) == 1:
        phrase = _noun_phrase(rng, scene.shapes[0])
        article_phrase = _with_article(phrase)
        return _pick(rng, ("a single " + phrase, "just one shape, " + article_phrase, "only " + article_phrase))
    phrases = [_with_article(_noun_phrase(rng, s)) for s in _shuffled(rng, scene.shapes)]
    head = _pick(rng, ("{}: ", "{}, ", "a picture with {}: ", "an image of {}, "))
    return head.format(_shape_count_phrase(len(phrases))) + _join_and(phrases)


def _caption_positioned(rng: np.random.Generator, scene: Scene) -> str:
    """'a picture of a blue square at the top and a red circle'."""
    shapes = _shuffled(rng, scene.shapes)
    first = _with_article(_noun_phrase(rng, shapes[0])) + " " + POSITION_PHRASES[(shapes[0].row, shapes[0].col)]
    rest = [_with_article(_noun_phrase(rng, s)) for s in shapes[1:]]
    prefix = _pick(rng, ("", "a picture of ", "there is "))
    return prefix + _join_and([first] + rest)


def _caption_vertical(rng: np.random.Generator, scene: Scene) -> str:
    """'a red circle above a blue square' for two shapes in different rows; otherwise a listing."""
    pairs = _vertical_pairs(scene)
    if len(scene.shapes) != 2 or not pairs:
        return _caption_listing(rng, scene)
    upper, lower = (_with_article(_noun_phrase(rng, s)) for s in pairs[0])
    template = _pick(rng, ("{u} above {l}", "{l} below {u}", "{u} is above {l}", "{l} under {u}"))
    return template.format(u=upper, l=lower)


_CAPTION_TEMPLATES = (_caption_listing, _caption_counted, _caption_positioned, _caption_vertical)
_CAPTION_WEIGHTS = (0.45, 0.2, 0.2, 0.15)


def make_caption(rng: np.random.Generator, scene: Scene) -> str:
    """One true caption of the scene, from a randomly chosen template."""
    caption = _pick_weighted(rng, _CAPTION_TEMPLATES, _CAPTION_WEIGHTS)(rng, scene)
    if _chance(rng, 0.1):
        caption += " on a gray background"
    return _stylise(rng, caption, 0.25)


def _distinct_captions(rng: np.random.Generator, scene: Scene, count: int) -> list:
    """Up to `count` different captions (fewer only if the templates run out)."""
    captions: list[str] = []
    for _ in range(50 * count):
        caption = make_caption(rng, scene)
        if caption not in captions:
            captions.append(caption)
        if len(captions) == count:
            break
    return captions


def _pretrain_items(rng: np.random.Generator, scenes: Sequence[Scene]) -> list:
    """One item per picture; some carry a caption list (sampled per access by the loader)."""
    items = []
    for scene in scenes:
        if _chance(rng, PRETRAIN_LIST_PROBABILITY):
            caption = _distinct_captions(rng, scene, int(rng.integers(2, 4)))
        else:
            caption = make_caption(rng, scene)
        items.append({"image": scene.path, "caption": caption})
    return items


def _retrieval_train_items(rng: np.random.Generator, scenes: Sequence[Scene]) -> list:
    """re_train format: one item per caption, `image_id` shared by the captions of one picture."""
    items = []
    for scene in scenes:
        for caption in _distinct_captions(rng, scene, RETRIEVAL_TRAIN_CAPTIONS):
            items.append({"image": scene.path, "caption": caption, "image_id": scene.name})
    return items


def _retrieval_eval_items(rng: np.random.Generator, scenes: Sequence[Scene]) -> list:
    """re_eval format: one item per picture with a caption list."""
    low, high = RETRIEVAL_EVAL_CAPTIONS
    return [
        {"image": s.path, "caption": _distinct_captions(rng, s, int(rng.integers(low, high + 1)))}
        for s in scenes
    ]


# ---------------------------------------------------------------------------------------------------------------
# VQA

# Plausible human slips; some fall outside the world (like real VQA annotators' answers).
_NOISY_ANSWERS = {
    "red": ("orange", "pink", "maroon"),
    "orange": ("red", "yellow"),
    "yellow": ("orange", "gold"),
    "green": ("lime", "dark green"),
    "blue": ("purple", "navy"),
    "purple": ("blue", "violet"),
    "white": ("gray", "silver"),
    "black": ("gray", "dark"),
    "circle": ("ball", "oval", "round"),
    "square": ("rectangle", "box"),
    "triangle": ("pyramid",),
    "diamond": ("square", "rhombus"),
    "star": ("asterisk",),
    "cross": ("plus", "x"),
    "small": ("tiny", "medium"),
    "large": ("big", "medium"),
    "yes": ("no",),
    "no": ("yes",),
    "0": ("1",),
    "1": ("2", "0"),
    "2": ("3", "1"),
    "3": ("4", "2"),
}


def _question_colour(rng: np.random.Generator, scene: Scene) -> Optional[tuple]:
    """'what color is the circle?' when exactly one circle is present."""
    candidates = _unique_kind_shapes(scene)
    if not candidates:
        return None
    shape = _pick(rng, candidates)
    template = _pick(rng, ("what color is the {}?", "what colour is the {}?", "what is the color of the {}?"))
    return template.format(shape.kind), shape.colour


def _question_kind(rng: np.random.Generator, scene: Scene) -> Optional[tuple]:
    """'what shape is the red object?' when exactly one red shape is present."""
    candidates = _unique_colour_shapes(scene)
    if not candidates:
        return None
    shape = _pick(rng, candidates)
    template = _pick(rng, ("what shape is the {} object?", "what shape is the {} one?", "what is the {} shape?"))
    return template.format(shape.colour), shape.kind


def _question_count(rng: np.random.Generator, scene: Scene) -> tuple:
    """'how many shapes are there?'; answers are digits, as VQA normalisation writes numbers."""
    template = _pick(
        rng, ("how many shapes are there?", "how many shapes are in the picture?", "how many objects are there?")
    )
    return template, str(len(scene.shapes))


def _question_colour_count(rng: np.random.Generator, scene: Scene) -> tuple:
    """'how many red shapes are there?' (present colours more often than absent ones)."""
    colour = _pick(rng, scene.shapes).colour if _chance(rng, 0.65) else _pick(rng, COLOUR_NAMES)
    template = _pick(rng, ("how many {} shapes are there?", "how many {} objects are in the image?"))
    return template.format(colour), str(sum(s.colour == colour for s in scene.shapes))


def _question_exists(rng: np.random.Generator, scene: Scene) -> tuple:
    """'is there a blue square?', yes and no equally often."""
    if _chance(rng, 0.5):
        shape = _pick(rng, scene.shapes)
        pair, answer = (shape.colour, shape.kind), "yes"
    else:
        pair, answer = _absent_pair(rng, scene), "no"
    template = _pick(rng, ("is there a {} {}?", "is there a {} {} in the picture?", "does the image contain a {} {}?"))
    return template.format(*pair), answer


def _question_size(rng: np.random.Generator, scene: Scene) -> tuple:
    """'what size is the red circle?' (caption scenes never repeat a colour-kind pair)."""
    shape = _pick(rng, scene.shapes)
    template = _pick(rng, ("what size is the {} {}?", "is the {} {} small or large?", "is the {} {} large or small?"))
    return template.format(shape.colour, shape.kind), shape.size


_QUESTION_MAKERS = (
    _question_colour,
    _question_kind,
    _question_count,
    _question_colour_count,
    _question_exists,
    _question_size,
)
# Weights keep every single answer far below half of the questions (the largest, "yes"/"no", near 12% each).
_QUESTION_WEIGHTS = (0.22, 0.2, 0.12, 0.1, 0.24, 0.12)


def make_question(rng: np.random.Generator, scene: Scene) -> tuple:
    """(question, true answer) about the scene, the type drawn among those the scene supports."""
    while True:
        result = _pick_weighted(rng, _QUESTION_MAKERS, _QUESTION_WEIGHTS)(rng, scene)
        if result is not None:
            return result


def _ten_answers(rng: np.random.Generator, answer: str) -> list:
    """Ten annotator answers: the true one at least seven times, the rest plausible slips."""
    slips = int(_pick(rng, (0, 0, 0, 1, 1, 2, 3)))
    answers = [answer] * (10 - slips) + [_pick(rng, _NOISY_ANSWERS[answer]) for _ in range(slips)]
    return _shuffled(rng, answers)


def _vqa_items(rng: np.random.Generator, scenes: Sequence[Scene], per_image: int, first_id: int) -> list:
    """`per_image` distinct questions for every scene, in the VQA format with ten answers each."""
    items = []
    for scene in scenes:
        asked: set[str] = set()
        for _ in range(50 * per_image):
            question, answer = make_question(rng, scene)
            if question in asked:
                continue
            asked.add(question)
            items.append(
                {
                    "dataset": "vqa",
                    "image": scene.path,
                    "question": question,
                    "question_id": first_id + len(items),
                    "answer": _ten_answers(rng, answer),
                }
            )
            if len(asked) == per_image:
                break
    return items


def _vqa_train_items(rng: np.random.Generator, scenes: Sequence[Scene], vqa_count: int, vg_count: int) -> list:
    """VQA-format questions spread over the pictures, then VG-format ones with a single answer string."""
    order = _shuffled(rng, scenes)
    items = []
    for index in range(vqa_count):
        scene = order[index % len(order)]
        question, answer = make_question(rng, scene)
        items.append(
            {
                "dataset": "vqa",
                "image": scene.path,
                "question": question,
                "question_id": index,
                "answer": _ten_answers(rng, answer),
            }
        )
    for _ in range(vg_count):
        scene = _pick(rng, scenes)
        question, answer = make_question(rng, scene)
        items.append({"dataset": "vg", "image": scene.path, "question": _stylise(rng, question, 0.5), "answer": answer})
    return items


def _answer_list(*item_lists: Sequence[dict]) -> list:
    """Every answer seen in the files plus the whole closed vocabulary, most frequent first."""
    counts: Counter = Counter()
    for items in item_lists:
        for item in items:
            answers = item["answer"]
            counts.update([answers] if isinstance(answers, str) else answers)
    vocabulary = list(COLOUR_NAMES) + list(KINDS) + list(SIZES) + ["yes", "no", "0", "1", "2", "3"]
    counts.update({answer: 0 for answer in vocabulary})
    return sorted(counts, key=lambda answer: (-counts[answer], answer))


# ---------------------------------------------------------------------------------------------------------------
# NLVR2 (left = images[0], right = images[1]; the order of the pair, so horizontal flips do not matter)


def _side_scene(side: str, left: Scene, right: Scene) -> Scene:
    """The scene named by 'left' or 'right'."""
    return left if side == "left" else right


def _colour_of_pair(rng: np.random.Generator, left: Scene, right: Scene) -> str:
    """A colour from the pair most of the time, so that both truth values occur."""
    if _chance(rng, 0.75):
        return _pick(rng, left.shapes + right.shapes).colour
    return _pick(rng, COLOUR_NAMES)


def _kind_of_pair(rng: np.random.Generator, left: Scene, right: Scene) -> str:
    """A kind from the pair most of the time."""
    if _chance(rng, 0.75):
        return _pick(rng, left.shapes + right.shapes).kind
    return _pick(rng, KINDS)


def _has_colour(scene: Scene, colour: str) -> bool:
    """Whether any shape has the colour."""
    return any(s.colour == colour for s in scene.shapes)


def _has_kind(scene: Scene, kind: str) -> bool:
    """Whether any shape has the kind."""
    return any(s.kind == kind for s in scene.shapes)


def _nlvr_both(rng: np.random.Generator, left: Scene, right: Scene) -> tuple:
    """'both images contain a red shape' / 'both images contain a circle'."""
    if _chance(rng, 0.5):
        colour = _colour_of_pair(rng, left, right)
        text = _pick(rng, ("both images contain a {} shape", "each image has at least one {} shape")).format(colour)
        return text, lambda a, b: _has_colour(a, colour) and _has_colour(b, colour)
    kind = _kind_of_pair(rng, left, right)
    text = _pick(rng, ("both images contain a {}", "there is a {} in each image")).format(kind)
    return text, lambda a, b: _has_kind(a, kind) and _has_kind(b, kind)


def _nlvr_more(rng: np.random.Generator, left: Scene, right: Scene) -> tuple:
    """'the left image has more shapes than the right image' and its variants."""
    first = _pick(rng, ("left", "right"))
    second = "right" if first == "left" else "left"

    def counts(a: Scene, b: Scene) -> tuple:
        return len(_side_scene(first, a, b).shapes), len(_side_scene(second, a, b).shapes)

    if _chance(rng, 0.5):
        return f"the {first} image has more shapes than the {second} image", lambda a, b: _greater(*counts(a, b))
    text = f"the {first} image contains fewer shapes than the {second} image"
    return text, lambda a, b: _greater(*reversed(counts(a, b)))


def _greater(x: int, y: int) -> bool:
    """x > y."""
    return x > y


def _nlvr_side_contains(rng: np.random.Generator, left: Scene, right: Scene) -> tuple:
    """'there is a circle in the right image' / 'the left image contains a red square'."""
    side = _pick(rng, ("left", "right"))
    if _chance(rng, 0.5):
        kind = _kind_of_pair(rng, left, right)
        text = f"there is {_with_article(kind)} in the {side} image"
        return text, lambda a, b: _has_kind(_side_scene(side, a, b), kind)
    shape = _pick(rng, left.shapes + right.shapes)

    def present(a: Scene, b: Scene) -> bool:
        return any(s.colour == shape.colour and s.kind == shape.kind for s in _side_scene(side, a, b).shapes)

    return f"the {side} image contains {_with_article(shape.colour + ' ' + shape.kind)}", present


def _nlvr_side_count(rng: np.random.Generator, left: Scene, right: Scene) -> tuple:
    """'the left image contains exactly two shapes'."""
    side = _pick(rng, ("left", "right"))
    count = int(rng.integers(1, 4))
    text = f"the {side} image contains exactly {_shape_count_phrase(count)}"
    return text, lambda a, b: len(_side_scene(side, a, b).shapes) == count


def _nlvr_total(rng: np.random.Generator, left: Scene, right: Scene) -> tuple:
    """'there are four shapes in total'."""
    total = len(left.shapes) + len(right.shapes)
    claimed = int(np.clip(total + _pick(rng, (-1, 0, 0, 1)), 2, 6))
    template = _pick(rng, ("there are {} shapes in total", "the two images contain {} shapes altogether"))
    return template.format(NUMBER_WORDS[claimed]), lambda a, b: len(a.shapes) + len(b.shapes) == claimed


def _nlvr_only_one(rng: np.random.Generator, left: Scene, right: Scene) -> tuple:
    """'only one image contains a blue shape' / 'exactly one image contains a star'."""
    if _chance(rng, 0.5):
        colour = _colour_of_pair(rng, left, right)
        text = f"only one image contains {_with_article(colour)} shape"
        return text, lambda a, b: _has_colour(a, colour) != _has_colour(b, colour)
    kind = _kind_of_pair(rng, left, right)
    return f"exactly one image contains {_with_article(kind)}", lambda a, b: _has_kind(a, kind) != _has_kind(b, kind)


def _nlvr_neither(rng: np.random.Generator, left: Scene, right: Scene) -> tuple:
    """'neither image contains a star'."""
    kind = _kind_of_pair(rng, left, right) if _chance(rng, 0.5) else _pick(rng, KINDS)
    return f"neither image contains {_with_article(kind)}", lambda a, b: not (_has_kind(a, kind) or _has_kind(b, kind))


def _nlvr_same_count(rng: np.random.Generator, left: Scene, right: Scene) -> tuple:
    """'both images contain the same number of shapes'."""
    template = _pick(
        rng, ("both images contain the same number of shapes", "the two images have the same number of shapes")
    )
    return template, lambda a, b: len(a.shapes) == len(b.shapes)


# Each template draws a statement from a pair of pictures and returns (text, truth(left, right)); _nlvr_item then
# looks for the pair the item shows among other pictures, so that the label is drawn apart from the text.
_NLVR_TEMPLATES = (
    _nlvr_both,
    _nlvr_more,
    _nlvr_side_contains,
    _nlvr_side_count,
    _nlvr_total,
    _nlvr_only_one,
    _nlvr_neither,
    _nlvr_same_count,
)
NLVR_PAIR_TRIES = 200  # pairs tried for a statement before another statement is drawn


def _random_pair(rng: np.random.Generator, scenes: Sequence[Scene]) -> tuple:
    """Two different scenes, in random order."""
    first, second = rng.choice(len(scenes), size=2, replace=False)
    return scenes[int(first)], scenes[int(second)]


def _nlvr_item(rng: np.random.Generator, scenes: Sequence[Scene], label: bool) -> dict:
    """A statement drawn from one random pair of pictures, shown with another pair for which it has the wanted truth
    value. As in NLVR2, where every sentence was written for one set of pictures and validated against others, the
    sentence alone then says nothing of its label: drawing the pair first and the statement until its truth matched
    (world format 1) let the text alone predict 62-64% of the held-out labels."""
    for _ in range(1000):
        sentence, truth = _pick(rng, _NLVR_TEMPLATES)(rng, *_random_pair(rng, scenes))
        for _ in range(NLVR_PAIR_TRIES):
            left, right = _random_pair(rng, scenes)
            if truth(left, right) == label:
                return {"images": [left.path, right.path], "sentence": _stylise(rng, sentence), "label": str(label)}
    raise RuntimeError("could not draw an NLVR2 statement with the requested label; the image pool is too small")


def _nlvr_items(rng: np.random.Generator, scenes: Sequence[Scene], count: int) -> list:
    """`count` items, exactly half True, in random order."""
    labels = _shuffled(rng, [index % 2 == 0 for index in range(count)])
    return [_nlvr_item(rng, scenes, label) for label in labels]


# ---------------------------------------------------------------------------------------------------------------
# SNLI-VE


def _ve_exists(rng: np.random.Generator, scene: Scene, truth: bool) -> str:
    """'there is a red circle' (true) or a near miss: absent pair or wrong size (false)."""
    if truth:
        phrase = _noun_phrase(rng, _pick(rng, scene.shapes), 0.4)
    elif _chance(rng, 0.3):
        shape = _pick(rng, scene.shapes)
        other_size = SIZES[1 - SIZES.index(shape.size)]
        phrase = f"{other_size} {shape.colour} {shape.kind}"
    else:
        phrase = "{} {}".format(*_absent_pair(rng, scene))
    template = _pick(rng, ("there is {}", "the picture contains {}", "{} is in the image", "the image shows {}"))
    return template.format(_with_article(phrase))


def _ve_count(rng: np.random.Generator, scene: Scene, truth: bool) -> str:
    """'there are two shapes in the picture' with the true or a wrong count."""
    count = len(scene.shapes)
    if not truth:
        count = _pick(rng, [n for n in (1, 2, 3, 4) if n != count])
    if count == 1:
        return _pick(rng, ("there is exactly one shape in the picture", "the image shows a single shape"))
    return _pick(rng, ("there are {} in the picture", "the image shows exactly {}")).format(_shape_count_phrase(count))


def _ve_colour_of_kind(rng: np.random.Generator, scene: Scene, truth: bool) -> Optional[str]:
    """'the circle is red' with the true or a wrong colour, when the kind occurs once."""
    candidates = _unique_kind_shapes(scene)
    if not candidates:
        return None
    shape = _pick(rng, candidates)
    colour = shape.colour if truth else _pick(rng, [c for c in COLOUR_NAMES if c != shape.colour])
    return f"the {shape.kind} is {colour}"


def _ve_absence(rng: np.random.Generator, scene: Scene, truth: bool) -> str:
    """'there is no green star': true for an absent pair, false for a present one."""
    if truth:
        pair = _absent_pair(rng, scene)
    else:
        shape = _pick(rng, scene.shapes)
        pair = (shape.colour, shape.kind)
    return _pick(rng, ("there is no {} {}", "the picture does not contain a {} {}")).format(*pair)


def _ve_vertical(rng: np.random.Generator, scene: Scene, truth: bool) -> Optional[str]:
    """'a red circle is above a blue square', reversed when false."""
    pairs = _vertical_pairs(scene)
    if not pairs:
        return None
    upper, lower = _pick(rng, pairs)
    if not truth:
        upper, lower = lower, upper
    first, second = (_with_article(f"{s.colour} {s.kind}") for s in (upper, lower))
    return f"{first} is above {second}" if _chance(rng, 0.5) else f"{second} is below {first}"


_VE_DECIDABLE = (_ve_exists, _ve_count, _ve_colour_of_kind, _ve_absence, _ve_vertical)
_VE_PROPERTIES = (
    "is heavy",
    "is made of wood",
    "is made of paper",
    "is made of metal",
    "feels warm",
    "is cold to the touch",
    "is expensive",
    "was drawn first",
    "is the artist's favourite",
    "will be erased tomorrow",
)
_VE_GENERIC = (
    "the shapes were drawn yesterday",
    "the picture was made by a child",
    "the picture was drawn in the morning",
    "the artist used a new brush",
    "this picture hangs in a museum",
    "the shapes are about to move",
    "someone is looking at the picture right now",
)


def _ve_neutral(rng: np.random.Generator, scene: Scene) -> str:
    """A statement the picture cannot decide, usually about a shape that is present."""
    if _chance(rng, 0.7):
        shape = _pick(rng, scene.shapes)
        return f"the {shape.colour} {shape.kind} {_pick(rng, _VE_PROPERTIES)}"
    return _pick(rng, _VE_GENERIC)


def _ve_sentence(rng: np.random.Generator, scene: Scene, label: str) -> str:
    """A hypothesis with the given label."""
    if label == "neutral":
        return _ve_neutral(rng, scene)
    while True:
        sentence = _pick(rng, _VE_DECIDABLE)(rng, scene, label == "entailment")
        if sentence is not None:
            return sentence


def _ve_items(rng: np.random.Generator, scenes: Sequence[Scene]) -> list:
    """One hypothesis per label for every picture (exactly balanced), pictures in random order."""
    items = []
    for scene in scenes:
        for label in _shuffled(rng, ("entailment", "neutral", "contradiction")):
            sentence = _stylise(rng, _ve_sentence(rng, scene, label))
            items.append({"image": scene.ve_id, "sentence": sentence, "label": label})
    return items


# ---------------------------------------------------------------------------------------------------------------
# Grounding (RefCOCO+ style)


class Descriptor(NamedTuple):
    """A referring expression's meaning: attribute constraints and an optional extreme direction."""

    attributes: tuple  # ((name, value), ...) with name in size/colour/kind
    direction: Optional[str]  # left/right/top/bottom: the extreme shape among those matching the attributes


_ATTRIBUTE_SUBSETS = tuple(
    tuple(name for name, keep in zip(("size", "colour", "kind"), mask) if keep)
    for mask in itertools.product((False, True), repeat=3)
)
_DIRECTION_KEYS = {
    "left": lambda s: s.col,
    "right": lambda s: -s.col,
    "top": lambda s: s.row,
    "bottom": lambda s: -s.row,
}
_DIRECTION_FORMS = {
    "left": ("{} on the left", "leftmost {}", "left {}"),
    "right": ("{} on the right", "rightmost {}", "right {}"),
    "top": ("{} at the top", "topmost {}", "top {}"),
    "bottom": ("{} at the bottom", "bottom {}", "lowest {}"),
}


def _attribute_group(shapes: Sequence[Shape], descriptor: Descriptor) -> list:
    """Indices of the shapes that satisfy every attribute constraint."""
    return [i for i, s in enumerate(shapes) if all(getattr(s, name) == value for name, value in descriptor.attributes)]


def resolve_descriptor(shapes: Sequence[Shape], descriptor: Descriptor) -> list:
    """Indices of the shapes a descriptor picks out (an extreme direction keeps the strict extremes only)."""
    group = _attribute_group(shapes, descriptor)
    if descriptor.direction is None or not group:
        return group
    key = _DIRECTION_KEYS[descriptor.direction]
    best = min(key(shapes[i]) for i in group)
    return [i for i in group if key(shapes[i]) == best]


def identifying_descriptors(shapes: Sequence[Shape], target: int) -> list:
    """Every descriptor that picks out exactly the target; a direction is used only to choose among several."""
    found = []
    for names in _ATTRIBUTE_SUBSETS:
        attributes = tuple((name, getattr(shapes[target], name)) for name in names)
        for direction in (None, "left", "right", "top", "bottom"):
            descriptor = Descriptor(attributes, direction)
            if not names and direction is None:
                continue
            if direction is not None and len(_attribute_group(shapes, descriptor)) < 2:
                continue
            if resolve_descriptor(shapes, descriptor) == [target]:
                found.append(descriptor)
    return found


def expression_text(rng: np.random.Generator, descriptor: Descriptor) -> str:
    """Words for a descriptor: 'the small red circle', 'the shape on the left', 'left blue one'."""
    values = dict(descriptor.attributes)
    adjectives = [values[name] for name in ("size", "colour") if name in values]
    nouns = ("shape", "object", "one") if adjectives else ("shape", "object")
    phrase = " ".join(adjectives + [values.get("kind") or _pick(rng, nouns)])
    if descriptor.direction is not None:
        phrase = _pick(rng, _DIRECTION_FORMS[descriptor.direction]).format(phrase)
    return ("the " if _chance(rng, 0.75) else "") + phrase


def _ref_sentences(rng: np.random.Generator, shapes: Sequence[Shape], target: int) -> list:
    """1-3 different expressions for one shape, appearance-only ones preferred (RefCOCO+ favours them)."""
    descriptors = identifying_descriptors(shapes, target)
    weights = [3.0 if d.direction is None else 1.0 for d in descriptors]
    wanted = min(len(descriptors), int(_pick_weighted(rng, (1, 2, 3), (0.35, 0.4, 0.25))))
    order = rng.choice(len(descriptors), size=wanted, replace=False, p=np.asarray(weights) / sum(weights))
    sentences: list[str] = []
    for index in order:
        text = expression_text(rng, descriptors[int(index)])
        if text not in sentences:
            sentences.append(text)
    return sentences


def inclusive_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU of two [x, y, w, h] boxes with the inclusive-pixel convention of the official grounding evaluation (x2 = x + w - 1)."""
    ax1, ay1, aw, ah = box_a[:4]
    bx1, by1, bw, bh = box_b[:4]
    ix1, iy1 = max(ax1, bx1), max(ay1, by1)
    ix2, iy2 = min(ax1 + aw - 1, bx1 + bw - 1), min(ay1 + ah - 1, by1 + bh - 1)
    inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if ix1 < ix2 and iy1 < iy2 else 0
    return inter / (aw * ah + bw * bh - inter)


def _box_from_corners(x0: float, y0: float, x1: float, y1: float) -> list:
    """[x, y, w, h] rounded to hundredths, as detector output looks."""
    x0, y0, x1, y1 = (round(float(v), 2) for v in (x0, y0, x1, y1))
    return [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)]


def _jittered_box(rng: np.random.Generator, bbox: Sequence[int], width: int, height: int) -> list:
    """A proposal a few pixels off the true box, inside the image, with IoU >= 0.6 against it."""
    x, y, w, h = bbox
    for _ in range(100):
        d = rng.uniform(-3.0, 3.0, size=4)
        x0, y0 = max(0.0, x + d[0]), max(0.0, y + d[1])
        x1, y1 = min(float(width), x + w + d[2]), min(float(height), y + h + d[3])
        box = _box_from_corners(x0, y0, x1, y1)
        if inclusive_iou(box, bbox) >= 0.6:
            return box
    raise RuntimeError(f"could not jitter box {bbox} within a {width}x{height} image")


def _distractor_boxes(rng: np.random.Generator, scene: Scene, count: int) -> list:
    """Proposals that match no shape (IoU < 0.5 with every true box): a box around two shapes, then random ones."""
    truths = [s.bbox for s in scene.shapes]
    boxes = []
    a, b = (truths[int(i)] for i in rng.choice(len(truths), size=2, replace=False))
    union = _box_from_corners(
        min(a[0], b[0]), min(a[1], b[1]), max(a[0] + a[2], b[0] + b[2]), max(a[1] + a[3], b[1] + b[3])
    )
    if max(inclusive_iou(union, t) for t in truths) < 0.5:
        boxes.append(union)
    side = min(scene.width, scene.height)
    while len(boxes) < count:
        w, h = rng.uniform(0.15 * side, 0.35 * side, size=2)
        x0, y0 = rng.uniform(0, scene.width - w), rng.uniform(0, scene.height - h)
        box = _box_from_corners(x0, y0, x0 + w, y0 + h)
        if max(inclusive_iou(box, t) for t in truths) < 0.3:
            boxes.append(box)
    return boxes


def _detections(rng: np.random.Generator, scene: Scene) -> list:
    """[[x, y, w, h, score, category], ...]: every true box jittered, plus 2-3 distractors, shuffled."""
    rows = []
    for shape in scene.shapes:
        box = _jittered_box(rng, shape.bbox, scene.width, scene.height)
        rows.append(box + [round(float(rng.uniform(0.55, 0.99)), 3), _category_id(shape.kind)])
    for box in _distractor_boxes(rng, scene, int(rng.integers(2, 4))):
        rows.append(box + [round(float(rng.uniform(0.3, 0.9)), 3), _category_id(_pick(rng, KINDS))])
    return _shuffled(rng, rows)


def _category_id(kind: str) -> int:
    """COCO-style category id (1-based)."""
    return KINDS.index(kind) + 1


def _grounding_split_names(counts: dict) -> list:
    """The split of every grounding picture, in drawing order."""
    names = []
    for split in ("train", "val", "testA", "testB"):
        names += [split] * counts[f"grounding_{split}_images"]
    return names


def _grounding_annotations(text_rng: np.random.Generator, scenes: Sequence[Scene], splits: Sequence[str]) -> dict:
    """COCO instances, REFER refs and the per-split json items for the grounding pictures."""
    images, annotations, refs = [], [], []
    items: dict = {"train": [], "val": [], "test": []}
    sent_count = 0
    for image_id, (scene, split) in enumerate(zip(scenes, splits), start=1):
        images.append({"id": image_id, "file_name": scene.file_name, "height": scene.height, "width": scene.width})
        for index, shape in enumerate(scene.shapes):
            ann_id = ref_id = len(annotations) + 1
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "bbox": list(shape.bbox),
                    "category_id": _category_id(shape.kind),
                    "area": shape.area,
                    "iscrowd": 0,
                }
            )
            sentences = _ref_sentences(text_rng, scene.shapes, index)
            refs.append(_ref_record(ref_id, image_id, ann_id, split, shape, scene, sentences, sent_count))
            sent_count += len(sentences)
            for sentence in sentences:
                if split == "train":
                    items["train"].append({"image": scene.path, "text": sentence})
                else:
                    items["val" if split == "val" else "test"].append(
                        {"image": scene.path, "text": sentence, "ref_id": ref_id}
                    )
    categories = [{"id": _category_id(k), "name": k, "supercategory": "shape"} for k in KINDS]
    instances = {"images": images, "annotations": annotations, "categories": categories}
    return {"instances": instances, "refs": refs, "items": items}


def _ref_record(
    ref_id: int, image_id: int, ann_id: int, split: str, shape: Shape, scene: Scene, sentences: list, first_sent_id: int
) -> dict:
    """One REFER ref dict; sentence ids are global, starting at `first_sent_id`."""
    sent_ids = list(range(first_sent_id, first_sent_id + len(sentences)))
    return {
        "ref_id": ref_id,
        "image_id": image_id,
        "ann_id": ann_id,
        "split": split,
        "sentences": [
            {"sent": s, "raw": s, "tokens": s.split(" "), "sent_id": i} for s, i in zip(sentences, sent_ids)
        ],
        "sent_ids": sent_ids,
        "category_id": _category_id(shape.kind),
        "file_name": scene.file_name,
    }


# ---------------------------------------------------------------------------------------------------------------
# Writing


def scaled_counts(scale: float) -> dict:
    """Item and picture counts for a scale (1.0 = default world); every count is at least MIN_COUNT."""
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    counts = {name: max(MIN_COUNT, int(round(base * scale))) for name, base in BASE_COUNTS.items()}
    for name in ("nlvr_train", "nlvr_dev", "nlvr_test"):
        counts[name] += counts[name] % 2  # even, so True and False split exactly in half
    counts["retrieval_train_images"] = min(counts["retrieval_train_images"], counts["train_images"])
    return counts


def _make_streams(seed: int) -> dict:
    """One generator per stream, all derived from numpy.random.default_rng(seed)."""
    root = np.random.default_rng(seed)
    child_seeds = root.integers(0, 2**63 - 1, size=len(STREAMS))
    return {name: np.random.default_rng(int(child)) for name, child in zip(STREAMS, child_seeds)}


def _write_json(path: Path, payload, indent: Optional[int] = None) -> None:
    """Deterministic JSON (fixed key order from construction, ASCII only)."""
    path.write_text(json.dumps(payload, indent=indent, ensure_ascii=True) + "\n", encoding="utf-8")


def _scene_record(scene: Scene) -> dict:
    """Ground-truth description of one picture for scenes.json."""
    shapes = [
        {
            "colour": s.colour,
            "kind": s.kind,
            "size": s.size,
            "row": s.row,
            "col": s.col,
            "bbox": list(s.bbox),
            "area": s.area,
        }
        for s in scene.shapes
    ]
    return {"width": scene.width, "height": scene.height, "shapes": shapes}


def _draw_all_pools(streams: dict, image_dir: Path, counts: dict) -> dict:
    """Every picture of the world, per pool."""
    caption, grounding = _sample_caption_layout, _sample_grounding_layout
    grounding_total = sum(counts[f"grounding_{s}_images"] for s in ("train", "val", "testA", "testB"))
    ve_total = counts["ve_train_images"] + counts["ve_dev_images"] + counts["ve_test_images"]
    return {
        "train": _draw_pool(streams["train_pool"], image_dir, "train", counts["train_images"], caption),
        "val": _draw_pool(streams["val_pool"], image_dir, "val", counts["val_images"], caption, unique=True),
        "test": _draw_pool(streams["test_pool"], image_dir, "test", counts["test_images"], caption, unique=True),
        "ve": _draw_pool(streams["ve_pool"], image_dir, "ve", ve_total, caption),
        "grounding": _draw_pool(streams["grounding_pool"], image_dir, "ground", grounding_total, grounding),
    }


def _task_files(streams: dict, pools: dict, counts: dict) -> dict:
    """Every json annotation list, keyed by file stem."""
    train, val, test = pools["train"], pools["val"], pools["test"]
    retrieval = streams["retrieval"]
    vqa = streams["vqa"]
    vqa_train = _vqa_train_items(vqa, train, counts["vqa_train_questions"], counts["vg_train_questions"])
    vqa_val = _vqa_items(vqa, val, VQA_VAL_PER_IMAGE, first_id=len(vqa_train))
    vqa_test = _vqa_items(vqa, test, VQA_TEST_PER_IMAGE, first_id=len(vqa_train) + len(vqa_val))
    nlvr = streams["nlvr"]
    ve_train_end = counts["ve_train_images"]
    ve_dev_end = ve_train_end + counts["ve_dev_images"]
    return {
        "pretrain": _pretrain_items(streams["pretrain"], train),
        "retrieval_train": _retrieval_train_items(retrieval, train[: counts["retrieval_train_images"]]),
        "retrieval_val": _retrieval_eval_items(retrieval, val),
        "retrieval_test": _retrieval_eval_items(retrieval, test),
        "vqa_train": vqa_train,
        "vqa_val": vqa_val,
        "vqa_test": vqa_test,
        "answer_list": _answer_list(vqa_train, vqa_val),
        "nlvr_train": _nlvr_items(nlvr, train, counts["nlvr_train"]),
        "nlvr_dev": _nlvr_items(nlvr, val, counts["nlvr_dev"]),
        "nlvr_test": _nlvr_items(nlvr, test, counts["nlvr_test"]),
        "ve_train": _ve_items(streams["ve"], pools["ve"][:ve_train_end]),
        "ve_dev": _ve_items(streams["ve"], pools["ve"][ve_train_end:ve_dev_end]),
        "ve_test": _ve_items(streams["ve"], pools["ve"][ve_dev_end:]),
    }


def _write_grounding(streams: dict, pools: dict, counts: dict, root: Path) -> tuple:
    """grounding_{train,val,test}.json and refcoco+/{refs(unc).p, instances.json, dets.json, cocos.json}.

    Returns the written paths and the number of items per grounding file and of refs per split.
    """
    scenes = pools["grounding"]
    built = _grounding_annotations(streams["grounding_text"], scenes, _grounding_split_names(counts))
    refcoco = root / REFCOCO_DIR
    refcoco.mkdir(parents=True, exist_ok=True)
    dets = {str(image_id): _detections(streams["dets"], scene) for image_id, scene in enumerate(scenes, start=1)}
    paths, item_counts = {}, {}
    for split, items in built["items"].items():
        paths[f"grounding_{split}"] = root / f"grounding_{split}.json"
        _write_json(paths[f"grounding_{split}"], items)
        item_counts[f"grounding_{split}"] = len(items)
    paths["refs"] = refcoco / "refs(unc).p"
    paths["refs"].write_bytes(pickle.dumps(built["refs"], protocol=4))
    paths["instances"] = refcoco / "instances.json"
    _write_json(paths["instances"], built["instances"])
    for name in ("dets", "cocos"):
        paths[name] = refcoco / f"{name}.json"
        _write_json(paths[name], dets)
    for split, count in Counter(ref["split"] for ref in built["refs"]).items():
        item_counts[f"refs_{split}"] = count
    return paths, item_counts


def _manifest(seed: int, scale: float, counts: dict, item_counts: dict, pools: dict) -> dict:
    """Counts, vocabulary and image roots of the generated world."""
    return {
        "generator": "synthetic.world",
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "scale": scale,
        "image_root": ".",  # relative to the root: every image path already starts with "images/"
        "refcoco_data": ".",
        "image_size": list(CAPTION_IMAGE_SIZE),
        "grounding_image_sizes": [list(s) for s in GROUNDING_IMAGE_SIZES],
        "vocabulary": {
            "colours": list(COLOUR_NAMES),
            "kinds": list(KINDS),
            "sizes": list(SIZES),
            "positions": sorted(set(POSITION_PHRASES.values())),
        },
        "pictures": {name: len(scenes) for name, scenes in pools.items()},
        "items": item_counts,
        "requested_counts": counts,
    }


_README = """Synthetic ALBEF world
(generated by `python -m synthetic.world --root <root> --seed {seed} --scale {scale}`)

Pictures: JPEG (quality 95) of 1-3 shapes ({caption_w}x{caption_h}) or, for grounding, 2-4 shapes (160 or 192 pixels a
side) on a plain or lightly noisy grey background. Each shape has a colour ({colours}), a kind ({kinds}), a size
(small, large) and a cell of a 3x3 grid (top/middle/bottom x left/center/right). The picture fully determines every
text.

Image root: every picture is in `images/`, and every image reference in every file below is relative to `<root>`
("images/train_000123.jpg"; a VE id is the same path without ".jpg": `<root>/<id>.jpg`). Set image_root, vqa_root and
vg_root of every config to `<root>`; for grounding also refcoco_data = `<root>`,
det_file = `<root>/refcoco+/dets.json` and coco_file = `<root>/refcoco+/cocos.json`.

Picture pools: train_* (pretraining, retrieval/VQA/NLVR2 training), val_* and test_* (held out from pretraining and all
training; no two val or two test pictures share their colour-kind content), ve_* (SNLI-VE, split by picture),
ground_* (grounding, split by picture into train/val/testA/testB; testA and testB are two disjoint halves of the test
pictures).

Files (JSON lists unless noted):
  pretrain.json          {{image, caption}}; caption is a string or a list of strings
  retrieval_train.json   {{image, caption, image_id}}, one item per caption
  retrieval_val.json     {{image, caption: [strings]}}, one item per picture (also retrieval_test.json)
  vqa_train.json         {{dataset: "vqa", image, question, question_id, answer: [10 strings]}} and
                         {{dataset: "vg", image, question, answer: string}}
  vqa_val.json           VQA items on val pictures (local validation)
  vqa_test.json          VQA items on test pictures; their answers allow local accuracy (the official loader
                         ignores them)
  answer_list.json       list of answer strings, most frequent first
  nlvr_{{train,dev,test}}.json  {{images: [left, right], sentence, label: "True"|"False"}}, labels exactly balanced;
                         each statement drawn apart from its pictures, so the text alone does not predict the label
  ve_{{train,dev,test}}.json    {{image: path without ".jpg", sentence, label}}, one item per label per picture
  grounding_train.json   {{image, text}}; grounding_val.json and grounding_test.json {{image, text, ref_id}}
                         (val = split 'val'; test = 'testA' + 'testB')
  refcoco+/refs(unc).p   pickle of a list of REFER ref dicts (ref_id, image_id, ann_id, split, sentences, sent_ids,
                         category_id, file_name)
  refcoco+/instances.json  COCO-style images, annotations (exact painted-pixel bbox [x, y, w, h]), categories
  refcoco+/dets.json     {{str(image_id): [[x, y, w, h, score, category_id], ...]}}: true boxes jittered by <= 3 pixels
                         (IoU >= 0.6) plus 2-3 distractors (IoU < 0.5 with every true box); cocos.json is identical
  scenes.json            {{picture name: {{width, height, shapes: [{{colour, kind, size, row, col, bbox, area}}]}}}}
  manifest.json          seed, scale, vocabulary and counts

Items per file:
{item_lines}
"""


def _readme(seed: int, scale: float, item_counts: dict) -> str:
    """README.txt text."""
    width = max(len(name) for name in item_counts)
    lines = "\n".join(f"  {name.ljust(width)}  {count}" for name, count in item_counts.items())
    return _README.format(
        seed=seed,
        scale=scale,
        caption_w=CAPTION_IMAGE_SIZE[0],
        caption_h=CAPTION_IMAGE_SIZE[1],
        colours=", ".join(COLOUR_NAMES),
        kinds=", ".join(KINDS),
        item_lines=lines,
    )


IDENTITY_KEYS = ("generator", "format_version", "seed", "scale")


def identity(root, required: bool = True) -> Optional[dict]:
    """What decides a generated world's content, from its manifest.json: a file trained on one world (the committed
    stand-in and pretraining of tests/fixtures/synthetic_pretrained) records it, and is refused on another
    (check_identity). Without a manifest: an error, or None when not `required`."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        if not required:
            return None
        raise FileNotFoundError(f"{path} is missing: generate the world with python -m synthetic.world --root {root}")
    manifest = json.loads(path.read_text())
    return {key: manifest.get(key) for key in IDENTITY_KEYS}


def check_identity(recorded: Optional[dict], root, path, remake: str) -> None:
    """Raises ValueError naming `path` and how to `remake` it when the world `recorded` in it is not the one under
    `root`."""
    actual = identity(root)
    if recorded != actual:
        raise ValueError(f"{path} was trained on the synthetic world {recorded}, not on the one under {root} "
                         f"({actual}): {remake}")


def generate(root, seed: int = 0, scale: float = 1.0) -> dict:
    """Write the whole world under `root`; returns {name: path string} of everything written."""
    root = Path(root)
    counts = scaled_counts(scale)
    streams = _make_streams(seed)
    image_dir = root / IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    pools = _draw_all_pools(streams, image_dir, counts)
    paths = {"root": root, "images": image_dir}
    item_counts = {}
    for stem, payload in _task_files(streams, pools, counts).items():
        paths[stem] = root / f"{stem}.json"
        _write_json(paths[stem], payload)
        item_counts[stem] = len(payload)
    grounding_paths, grounding_counts = _write_grounding(streams, pools, counts, root)
    paths.update(grounding_paths)
    item_counts.update(grounding_counts)
    paths["scenes"] = root / "scenes.json"
    _write_json(paths["scenes"], {s.name: _scene_record(s) for pool in pools.values() for s in pool})
    paths["manifest"] = root / "manifest.json"
    _write_json(paths["manifest"], _manifest(seed, scale, counts, item_counts, pools), indent=2)
    paths["readme"] = root / "README.txt"
    paths["readme"].write_text(_readme(seed, scale, item_counts), encoding="utf-8")
    return {name: str(path) for name, path in paths.items()}


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m synthetic.world",
                                     description="Write the deterministic synthetic ALBEF world.")
    parser.add_argument("--root", default="data/synthetic", help="output folder (default: data/synthetic)")
    parser.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")
    parser.add_argument("--scale", type=float, default=1.0, help="size multiplier; 0.1 gives a tiny world")
    args = parser.parse_args(argv)
    paths = generate(args.root, seed=args.seed, scale=args.scale)
    manifest = json.loads(Path(paths["manifest"]).read_text())
    for name, count in manifest["items"].items():
        print(f"{name:>18}: {count}")
    print(f"wrote {sum(manifest['pictures'].values())} pictures and annotations under {args.root}")


if __name__ == "__main__":
    main()
