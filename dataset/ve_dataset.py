"""SNLI-VE dataset in the official format: {image: Flickr30k id without extension, sentence, label}."""

from dataset.image_io import AnnotationDataset, join_root, load_image

VE_LABELS = {"entailment": 2, "neutral": 1, "contradiction": 0}


class ve_dataset(AnnotationDataset):
    """SNLI-VE items -> (image, sentence, label) with image at image_root/<id>.jpg and labels 2/1/0."""

    REQUIRED_KEYS = ("image", "sentence", "label")

    def __init__(self, ann_file, transform, image_root="", max_words=30, skip_bad_images=False, raw_text=False):
        """Read the annotations, rejecting unknown labels up front."""
        super().__init__(ann_file, transform, image_root, max_words, skip_bad_images, raw_text=raw_text)
        unknown = sorted({str(ann["label"]) for ann in self.ann} - set(VE_LABELS))
        if unknown:
            raise ValueError(f"SNLI-VE annotations {ann_file} have unknown labels {unknown}; use {list(VE_LABELS)}")

    def load_item(self, index: int):
        """Return (image tensor, cleaned sentence, label int)."""
        ann = self.ann[index]
        image = load_image(join_root(self.image_root, f"{ann['image']}.jpg"), index)
        return self.transform(image), self.clean_text(ann["sentence"]), VE_LABELS[ann["label"]]
