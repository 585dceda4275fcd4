"""Image-caption datasets: pretraining pairs and image-text retrieval (train and eval) in the official formats."""

import random

from dataset.image_io import AnnotationDataset, join_root, load_image


class pretrain_dataset(AnnotationDataset):
    """Pretraining pairs: items {image (absolute or under image_root), caption (string or list)} -> (image, caption).

    Images are opened lazily in `__getitem__`."""

    REQUIRED_KEYS = ("image", "caption")
    CAPTION_SAMPLING = ("random", "per_caption")

    def __init__(self, ann_file, transform, image_root="", max_words=30, skip_bad_images=False,
                 caption_sampling="random", raw_text=False):
        """`caption_sampling`: 'random' (ALBEF: one item per picture, a caption list sampled anew on every access) or
        'per_caption' (VLMo: one item per caption, so a picture with n captions is seen n times per epoch)."""
        super().__init__(ann_file, transform, image_root, max_words, skip_bad_images, raw_text=raw_text)
        if caption_sampling not in self.CAPTION_SAMPLING:
            raise ValueError(f"data.caption_sampling: {caption_sampling!r} unknown; use one of {self.CAPTION_SAMPLING}")
        if caption_sampling == "per_caption":
            self.ann = [{**ann, "caption": caption} for ann in self.ann
                        for caption in (ann["caption"] if isinstance(ann["caption"], list) else [ann["caption"]])]

    def load_item(self, index: int):
        """Return (image tensor, cleaned caption); a caption list is sampled anew on every access."""
        ann = self.ann[index]
        caption = ann["caption"]
        if isinstance(caption, list):
            caption = random.choice(caption)
        image = load_image(join_root(self.image_root, ann["image"]), index)
        return self.transform(image), self.clean_text(caption)


def contiguous_ids(keys) -> dict:
    """Map each distinct key to 0, 1, 2, ... in order of first appearance."""
    ids = {}
    for key in keys:
        if key not in ids:
            ids[key] = len(ids)
    return ids


class re_train_dataset(AnnotationDataset):
    """Retrieval training: one item per caption {image, caption, image_id} -> (image, caption, idx)."""

    REQUIRED_KEYS = ("image", "caption", "image_id")

    def __init__(self, ann_file, transform, image_root="", max_words=30, skip_bad_images=False, raw_text=False):
        """Read the annotations and number the image ids contiguously by first appearance."""
        super().__init__(ann_file, transform, image_root, max_words, skip_bad_images, raw_text=raw_text)
        self.img_ids = contiguous_ids(ann["image_id"] for ann in self.ann)

    def load_item(self, index: int):
        """Return (image tensor, cleaned caption, contiguous image index)."""
        ann = self.ann[index]
        image = load_image(join_root(self.image_root, ann["image"]), index)
        caption = self.clean_text(ann["caption"])
        return self.transform(image), caption, self.img_ids[ann["image_id"]]


class re_eval_dataset(AnnotationDataset):
    """Retrieval evaluation: one item per image {image, caption: list} -> (image, index), plus text maps.

    `text` holds every cleaned caption in order, `image` every image path, `img2txt[i]` the text ids of image i
    and `txt2img[t]` the image id of text t.
    """

    REQUIRED_KEYS = ("image", "caption")

    def __init__(self, ann_file, transform, image_root="", max_words=30, skip_bad_images=False, raw_text=False):
        """Read the annotations and build the flattened text list and both ground-truth maps."""
        super().__init__(ann_file, transform, image_root, max_words, skip_bad_images, raw_text=raw_text)
        self.text, self.image, self.txt2img, self.img2txt = [], [], {}, {}
        for img_id, ann in enumerate(self.ann):
            self._add_image(img_id, ann)

    def _add_image(self, img_id: int, ann: dict) -> None:
        """Append one image and its captions to the flattened lists and maps."""
        captions = ann["caption"]
        if not isinstance(captions, list):
            raise ValueError(
                f"retrieval eval annotation {img_id} ('{ann['image']}') must have a list of captions; "
                f"use re_train_dataset for one-caption-per-item files"
            )
        self.image.append(ann["image"])
        self.img2txt[img_id] = []
        for caption in captions:
            txt_id = len(self.text)
            self.text.append(self.clean_text(caption))
            self.img2txt[img_id].append(txt_id)
            self.txt2img[txt_id] = img_id

    def load_item(self, index: int):
        """Return (image tensor, index of the image)."""
        image = load_image(join_root(self.image_root, self.ann[index]["image"]), index)
        return self.transform(image), index
