"""RefCOCO+ weakly-supervised grounding dataset in the official format: {image, text[, ref_id]}."""

import os

from dataset.caption_dataset import contiguous_ids
from dataset.image_io import AnnotationDataset, join_root, load_image
from dataset.text import pre_caption


class grounding_dataset(AnnotationDataset):
    """Grounding items: train -> (image, text, idx by image file basename); test -> (image, text, ref_id)."""

    def __init__(self, ann_file, transform, image_root="", max_words=30, mode="train", skip_bad_images=False):
        """Read the annotations (val and test files may be given together as a list)."""
        if mode not in ("train", "test"):
            raise ValueError(f"grounding_dataset (dataset/grounding_dataset.py): mode is train or test, not {mode!r}")
        required = ("image", "text") + (("ref_id",) if mode == "test" else ())
        super().__init__(ann_file, transform, image_root, max_words, skip_bad_images, required_keys=required)
        self.mode = mode
        # All expressions of one image file share an idx, so they are ITC positives of each other.
        self.img_ids = contiguous_ids(os.path.basename(ann["image"]) for ann in self.ann) if mode == "train" else {}

    def load_item(self, index: int):
        """Return (image tensor, cleaned expression, idx) in train mode, (image, expression, ref_id) in test."""
        ann = self.ann[index]
        image = self.transform(load_image(join_root(self.image_root, ann["image"]), index))
        text = pre_caption(ann["text"], self.max_words)
        if self.mode == "test":
            return image, text, ann["ref_id"]
        return image, text, self.img_ids[os.path.basename(ann["image"])]
