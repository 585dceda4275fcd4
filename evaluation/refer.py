"""A minimal reader for the RefCOCO+ annotation files used by grounding evaluation.

Files (the layout of the REFER toolkit's data folder, `<refcoco_data>/refcoco+/`):
- `refs(unc).p`: a pickled list of ref dicts with at least ref_id, image_id, ann_id, split (train/val/testA/testB);
- `instances.json`: COCO-style {images: [{id, height, width, ...}], annotations: [{id, image_id, bbox: [x,y,w,h]}]};
- `dets.json` (path from the config's det_file): {str(image_id): [[x, y, w, h, ...], ...]} detector proposals.
Only what the evaluation needs is read; no image or plotting libraries are involved.
"""
import json
import os
import pickle

SPLITS = ('train', 'val', 'testA', 'testB')


class ReferError(RuntimeError):
    """A RefCOCO+ annotation file is missing or malformed."""


class RefCOCO:
    """Refs, annotations and images of one REFER dataset (e.g. refcoco+ with the unc split)."""

    def __init__(self, data_root, dataset='refcoco+', split_by='unc'):
        folder = os.path.join(data_root, dataset)
        self.refs_path = os.path.join(folder, f'refs({split_by}).p')
        self.instances_path = os.path.join(folder, 'instances.json')
        for path in (self.refs_path, self.instances_path):
            if not os.path.isfile(path):
                raise ReferError(f'{path} not found; set refcoco_data to the folder that holds {dataset}/ with '
                                 f'refs({split_by}).p and instances.json (see docs/README_grounding.md)')
        with open(self.refs_path, 'rb') as f:
            refs = pickle.load(f)
        with open(self.instances_path) as f:
            instances = json.load(f)
        self.refs = {int(r['ref_id']): r for r in refs}
        self.anns = {int(a['id']): a for a in instances['annotations']}
        self.images = {int(i['id']): i for i in instances['images']}
        for ref_id, ref in self.refs.items():
            if ref['split'] not in SPLITS:
                raise ReferError(f'{self.refs_path}: ref {ref_id} has split {ref["split"]!r}, not one of {SPLITS}')
            if int(ref['ann_id']) not in self.anns:
                raise ReferError(f'{self.refs_path}: ref {ref_id} names annotation {ref["ann_id"]}, which '
                                 f'{self.instances_path} lacks')

    def ref(self, ref_id):
        """The ref dict of `ref_id` (a clear error for an unknown id)."""
        try:
            return self.refs[int(ref_id)]
        except KeyError:
            raise ReferError(f'ref_id {ref_id} is not in {self.refs_path}; the grounding test file and the REFER '
                             f'annotations come from different releases') from None

    def split(self, ref_id):
        """'train', 'val', 'testA' or 'testB'."""
        return self.ref(ref_id)['split']

    def box(self, ref_id):
        """Ground-truth box [x, y, w, h] of the referred object."""
        return list(self.anns[int(self.ref(ref_id)['ann_id'])]['bbox'])

    def image(self, ref_id):
        """The COCO image record (id, height, width, ...) of the ref."""
        return self.images[int(self.ref(ref_id)['image_id'])]

    def image_id(self, ref_id):
        """COCO image id of the ref."""
        return int(self.ref(ref_id)['image_id'])

    def ref_ids(self, split=None):
        """Every ref id, or those of one split, in file order."""
        return [r for r, ref in self.refs.items() if split is None or ref['split'] == split]


def load_detections(path):
    """Detector proposals {image_id (int): [[x, y, w, h, ...], ...]} from a dets.json file."""
    if not os.path.isfile(path):
        raise ReferError(f'detection file {path} not found; set det_file to the MAttNet proposals '
                         f'(refcoco+/dets.json, see docs/README_grounding.md)')
    with open(path) as f:
        dets = json.load(f)
    return {int(k): [list(map(float, d)) for d in v] for k, v in dets.items()}
