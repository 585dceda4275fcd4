"""NLVR2 dataset in the official format: {images: [path0, path1], sentence, label: 'True'|'False'}."""

from dataset.image_io import AnnotationDataset, join_root, load_image


class nlvr_dataset(AnnotationDataset):
    """NLVR2 items -> (image0, image1, sentence, label) with label 1 iff the annotation says 'True'; both images go
    through `transform` independently."""

    REQUIRED_KEYS = ("images", "sentence", "label")

    def load_item(self, index: int):
        """Return (image0 tensor, image1 tensor, cleaned sentence, label int)."""
        ann = self.ann[index]
        path0, path1 = ann["images"]
        image0 = self.transform(load_image(join_root(self.image_root, path0), index))
        image1 = self.transform(load_image(join_root(self.image_root, path1), index))
        label = 1 if ann["label"] == "True" else 0
        return image0, image1, self.clean_text(ann["sentence"]), label
