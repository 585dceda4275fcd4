"""`python -m reproduce check CELL --data_root DIR`: everything a cell's run reads, verified before any training.

Annotation files (present, valid JSON lists with the task's fields, the split sizes of the right data version), image
roots and images (every one, or a stated random sample), and the starting checkpoint (readable with
`weights_only=True`, of the layout the step expects, with the released number of keys). Each problem is printed with
its file and the fix; the exit status is 1 when there is any.
"""
import json
import os
import pickle
import random
from collections import Counter
from dataclasses import dataclass, field

from .cells import TASK_LAYOUT, released_path

# ---- annotation formats (the official ALBEF JSON lists) ---------------------------------------------------------
VE_LABELS = ('entailment', 'neutral', 'contradiction')
NLVR_LABELS = ('True', 'False')


def _is_str(x):
    return isinstance(x, str)


def _is_str_list(x):
    return isinstance(x, list) and all(isinstance(s, str) for s in x)


def _caption_any(x):
    return _is_str(x) or (_is_str_list(x) and len(x) > 0)


# format -> (required fields with a validity test, image roots the paths are joined to, how to list the images)
FIELDS = {
    'pretrain': {'image': _is_str, 'caption': _caption_any},
    'retrieval_train': {'image': _is_str, 'caption': _is_str, 'image_id': lambda x: x is not None},
    'retrieval_eval': {'image': _is_str, 'caption': lambda x: _is_str_list(x) and len(x) > 0},
    'vqa_train': {'image': _is_str, 'question': _is_str, 'dataset': lambda x: x in ('vqa', 'vg'),
                  'answer': lambda x: _is_str(x) or (_is_str_list(x) and len(x) > 0)},
    'vqa_test': {'image': _is_str, 'question': _is_str, 'question_id': lambda x: isinstance(x, int)},
    'nlvr': {'images': lambda x: _is_str_list(x) and len(x) == 2, 'sentence': _is_str,
             'label': lambda x: x in NLVR_LABELS},
    've': {'image': _is_str, 'sentence': _is_str, 'label': lambda x: x in VE_LABELS},
    'grounding_train': {'image': _is_str, 'text': _is_str},
    'grounding_test': {'image': _is_str, 'text': _is_str, 'ref_id': lambda x: isinstance(x, int)},
}
FORMAT_HELP = {
    'pretrain': '{image, caption (string or list)}',
    'retrieval_train': '{image, caption (string), image_id}, one item per caption',
    'retrieval_eval': '{image, caption: [strings]}, one item per image',
    'vqa_train': '{dataset: vqa|vg, image, question, answer}',
    'vqa_test': '{image, question, question_id (int)}',
    'answer_list': 'a JSON list of answer strings',
    'nlvr': '{images: [left, right], sentence, label: "True"|"False"}',
    've': '{image (Flickr30K id), sentence, label: entailment|neutral|contradiction}',
    'grounding_train': '{image, text}',
    'grounding_test': '{image, text, ref_id (int)}',
    'refer_refs': 'a pickled list of REFER refs {ref_id, image_id, ann_id, split, ...}',
    'coco_instances': 'a COCO-style JSON object {images, annotations}',
    'detections': 'a JSON object {str(image_id): [[x, y, w, h, ...], ...]}',
}
FORMATS = tuple(FORMAT_HELP)


def image_refs(fmt, item):
    """(root config key, relative path) of every image an item reads (official loaders, ALBEF data notes 11.1)."""
    if fmt == 'pretrain':
        return [('image_root', item['image'])]
    if fmt in ('retrieval_train', 'retrieval_eval', 'grounding_train', 'grounding_test'):
        return [('image_root', item['image'])]
    if fmt in ('vqa_train', 'vqa_test'):
        return [('vg_root' if item.get('dataset') == 'vg' else 'vqa_root', item['image'])]
    if fmt == 'nlvr':
        return [('image_root', p) for p in item['images']]
    if fmt == 've':
        return [('image_root', f"{item['image']}.jpg")]
    return []


def counts_of(fmt, data):
    """The split sizes of a loaded file (the names used under `expect:` in cells.yaml)."""
    if fmt == 'refer_refs':
        out = {'items': len(data)}
        for split, n in Counter(r.get('split') for r in data if isinstance(r, dict)).items():
            out[f'refs_{split}'] = n
        return out
    if not isinstance(data, list):
        return {'items': len(data)} if isinstance(data, dict) else {}
    out = {'items': len(data)}
    if fmt == 'answer_list':
        out['answers'] = len(data)
    if fmt in ('vqa_train', 'vqa_test'):
        out['questions'] = len(data)
    if fmt in FIELDS and fmt != 'nlvr':
        out['images'] = len({str(d.get('image')) for d in data if isinstance(d, dict)})
    if fmt == 'retrieval_eval':
        out['captions'] = sum(len(d.get('caption') or []) for d in data if isinstance(d, dict))
    if fmt == 'retrieval_train':
        out['captions'] = len(data)
    return out


# ---- the result of a check --------------------------------------------------------------------------------------
@dataclass
class Finding:
    level: str  # 'problem' | 'warning'
    where: str
    what: str
    fix: str = ''

    def __str__(self):
        tag = 'PROBLEM' if self.level == 'problem' else 'warning'
        return f'{tag} {self.where}: {self.what}' + (f'\n    fix: {self.fix}' if self.fix else '')


@dataclass
class CheckResult:
    findings: list = field(default_factory=list)
    files: int = 0
    images_checked: int = 0
    images_total: int = 0
    images_skipped: bool = False
    checkpoint: str = ''

    def problem(self, where, what, fix=''):
        self.findings.append(Finding('problem', str(where), what, fix))

    def warning(self, where, what, fix=''):
        self.findings.append(Finding('warning', str(where), what, fix))

    @property
    def problems(self):
        return [f for f in self.findings if f.level == 'problem']

    @property
    def ok(self):
        return not self.problems


REDOWNLOAD = 're-download or re-extract it from the ALBEF annotation release (data.tar.gz / json_pretrain.zip)'
REGENERATE = 'regenerate the synthetic world (python -m synthetic.world --root DIR)'


# ---- annotation files -------------------------------------------------------------------------------------------
def read_annotation(path, fmt, result, refetch=REDOWNLOAD):
    """Load one file; returns the data or None after recording why it cannot be used."""
    if not os.path.isfile(path):
        result.problem(path, 'file not found', f'put the file there ({FORMAT_HELP.get(fmt, fmt)}), or pass the '
                                               f'folder that holds it as --data_root')
        return None
    if fmt == 'refer_refs':
        try:
            with open(path, 'rb') as f:
                data = pickle.load(f)
        except Exception as e:
            result.problem(path, f'cannot be unpickled ({type(e).__name__}: {e}); truncated or corrupt?',
                           'copy refs(unc).p again from the REFER RefCOCO+ release')
            return None
        if not isinstance(data, list):
            result.problem(path, f'holds a {type(data).__name__}, expected {FORMAT_HELP[fmt]}',
                           'use the UNC split file refs(unc).p of RefCOCO+')
            return None
        return data
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        result.problem(path, f'not valid JSON at line {e.lineno} column {e.colno} ({e.msg}): truncated or corrupt',
                       refetch)
        return None
    except UnicodeDecodeError as e:
        result.problem(path, f'not UTF-8 text ({e}); is it an archive or an image?', refetch)
        return None
    if fmt in ('coco_instances', 'detections'):
        if not isinstance(data, dict):
            result.problem(path, f'holds a JSON {type(data).__name__}, expected {FORMAT_HELP[fmt]}', refetch)
            return None
        if fmt == 'coco_instances' and not {'images', 'annotations'} <= set(data):
            result.problem(path, f'lacks "images"/"annotations" (has {sorted(data)[:5]})',
                           'use instances.json of the REFER RefCOCO+ release')
            return None
        return data
    if not isinstance(data, list):
        result.problem(path, f'holds a JSON {type(data).__name__}, expected a list of {FORMAT_HELP.get(fmt, fmt)}',
                       refetch)
        return None
    if fmt == 'answer_list':
        if not _is_str_list(data):
            result.problem(path, 'is not a list of strings', refetch)
            return None
        return data
    bad = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            bad.append((i, 'not a JSON object'))
            continue
        for name, valid in FIELDS[fmt].items():
            if name not in item:
                if not (fmt == 'vqa_train' and name == 'dataset'):
                    bad.append((i, f'no "{name}"'))
                    break
            elif not valid(item[name]):
                bad.append((i, f'"{name}" = {str(item[name])[:40]!r}'))
                break
    if bad:
        shown = '; '.join(f'item {i}: {why}' for i, why in bad[:3])
        result.problem(path, f'{len(bad)} of {len(data)} items do not have the {fmt} format {FORMAT_HELP[fmt]} '
                             f'({shown})', f'is this the right file for this key? otherwise {refetch}')
        return None
    return data


def expected_counts(entry, data_root, path):
    """(expected counts, source) of a file entry: its `expect` dict, or the synthetic world's manifest.json."""
    expect = entry.get('expect')
    if expect == 'manifest':
        manifest_path = os.path.join(data_root, 'manifest.json')
        try:
            with open(manifest_path, encoding='utf-8') as f:
                items = json.load(f)['items']
        except (OSError, ValueError, KeyError):
            return None, manifest_path
        stem = os.path.splitext(os.path.basename(path))[0]
        if entry['format'] == 'refer_refs':
            return {k: v for k, v in items.items() if k.startswith('refs_')}, 'manifest'
        return ({'items': items[stem]} if stem in items else None), 'manifest'
    if isinstance(expect, dict):
        return dict(expect), entry.get('expect_source', 'public')
    return None, None


def check_counts(entry, data, path, data_root, result):
    expected, source = expected_counts(entry, data_root, path)
    if expected is None:
        if source:  # a manifest was expected but is not there
            result.warning(path, f'no readable manifest.json at {source}: split sizes not checked',
                           'regenerate the synthetic world (python -m synthetic.world --root DIR)')
        return
    found = counts_of(entry['format'], data)
    for name, want in expected.items():
        have = found.get(name)
        if have == want:
            continue
        what = f'{name} = {have}, expected {want}'
        if source == 'paper':
            result.problem(path, what + ' (the split the paper reports on)',
                           f'use the split of the ALBEF annotation release; {REDOWNLOAD}')
        elif source == 'manifest':
            result.problem(path, what + ' (from manifest.json of the synthetic world)',
                           f'the file was changed after generation: {REGENERATE}')
        else:
            result.warning(path, what + ' (public statistics of the dataset, not confirmed against the ALBEF '
                                        'annotation release)', 'check that this is the split you intend to use')


# ---- images -----------------------------------------------------------------------------------------------------
def check_images(refs, sample, seed, result, progress=True):
    """Open every image of `refs` ([(path, file it comes from)]) or a random sample of `sample` of them."""
    from dataset.image_io import load_image
    unique = list(dict.fromkeys(refs))
    result.images_total = len(unique)
    if sample is not None and sample < len(unique):
        chosen = random.Random(seed).sample(unique, sample)
        print(f'images: checking a random sample of {sample} of {len(unique)} (seed {seed}); '
              f'--images all checks every one')
    else:
        chosen = unique
        print(f'images: checking all {len(unique)}')
    missing, unreadable = [], []
    iterator = chosen
    if progress:
        from tqdm import tqdm
        iterator = tqdm(chosen, desc='images', unit='img', mininterval=1.0)
    for path, source in iterator:
        if not os.path.isfile(path):
            missing.append((path, source))
            continue
        try:
            load_image(path)
        except Exception as e:
            unreadable.append((path, source, str(e).split('. Fix:')[0]))
    result.images_checked = len(chosen)
    for path, source in missing[:10]:
        result.problem(path, f'image missing (listed in {os.path.basename(source)})',
                       'copy the image there; check the image root folder and the annotation paths')
    if len(missing) > 10:
        result.problem(f'{len(missing) - 10} more images', 'missing (the first 10 are listed above)',
                       'check the image root folder (a whole sub-folder missing?)')
    for path, source, why in unreadable[:10]:
        result.problem(path, f'image unreadable (listed in {os.path.basename(source)}): {why}',
                       'replace the file with an intact copy')
    if len(unreadable) > 10:
        result.problem(f'{len(unreadable) - 10} more images', 'unreadable (the first 10 are listed above)',
                       'replace them with intact copies')


# ---- checkpoints ------------------------------------------------------------------------------------------------
LAYOUT_HELP = {
    'pretrain': 'a pretraining checkpoint (text_encoder.bert.*, e.g. ALBEF.pth / ALBEF_4M.pth)',
    'retrieval': 'a retrieval/grounding model (text_encoder.*, itm_head.*, e.g. mscoco.pth / refcoco.pth)',
    'vqa': 'a VQA model (text_decoder.*)',
    'ta': 'a text-assignment (NLVR2 pretraining) model (ta_head.*, written by Pretrain_nlvr.py)',
    'nlvr': 'an NLVR2 model (cls_head.2.weight with 2 classes)',
    've': 'an SNLI-VE model (cls_head.2.weight with 3 classes)',
    'unknown': 'no ALBEF layout we know',
}


def checkpoint_layout(sd):
    """The layout of a state dict, told apart with the detectors of models/checkpoint.py."""
    from models.checkpoint import is_pretrain_layout, is_ta_layout, is_vqa_layout
    if is_vqa_layout(sd):
        return 'vqa'
    if is_ta_layout(sd):
        return 'ta'
    if is_pretrain_layout(sd):
        return 'pretrain'
    head = sd.get('cls_head.2.weight')
    if head is not None and hasattr(head, 'shape'):
        return {2: 'nlvr', 3: 've'}.get(int(head.shape[0]), 'unknown')
    if 'itm_head.weight' in sd:
        return 'retrieval'
    return 'unknown'


def load_state_dict_weights_only(path):
    """torch.load(weights_only=True) on CPU (memory-mapped where the format allows), unwrapped to the state dict."""
    import torch
    from models.checkpoint import unwrap_state_dict
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except RuntimeError as e:
        if 'mmap' not in str(e):
            raise
        obj = torch.load(path, map_location='cpu', weights_only=True)  # legacy (non-zip) files cannot be mapped
    return unwrap_state_dict(obj, path)


def check_checkpoint(path, expected_layout, result, released=None, keys=(), trust=False, task_layout=None):
    """Readable, of the expected layout and (for a released file) with the released number of keys."""
    result.checkpoint = path
    if not os.path.isfile(path):
        result.problem(path, 'checkpoint not found',
                       f'put {released or "the file"} there, or pass its path with --checkpoint')
        return
    try:
        if trust:
            from models.checkpoint import load_state_dict_file
            sd = load_state_dict_file(path)
        else:
            sd = load_state_dict_weights_only(path)
    except Exception as e:
        msg = str(e).split('\n')[0][:200]
        if 'weights_only' in str(e) or 'Unpickl' in type(e).__name__:
            result.problem(path, f'cannot be read with torch.load(weights_only=True): {msg}',
                           'if the file is from a source you trust (old checkpoints pickle the config and scheduler '
                           'state), add --trust_checkpoint; otherwise re-download it')
        else:
            result.problem(path, f'cannot be read ({type(e).__name__}: {msg}): truncated or corrupt',
                           're-download it (or pick an earlier checkpoint of your run)')
        return
    from models.checkpoint import has_momentum_keys
    layout = checkpoint_layout(sd)
    if layout != expected_layout:
        result.problem(path, f'is {LAYOUT_HELP[layout]}, but this step expects {LAYOUT_HELP[expected_layout]}',
                       f'pass {released or "a checkpoint of that layout"} with --checkpoint' + (
                           '; to fine-tune from this pretraining file, drop --evaluate' if layout == 'pretrain' else
                           '; to evaluate this fine-tuned file, add --evaluate' if expected_layout == 'pretrain'
                           and layout == task_layout else ''))
        return
    if layout == 'pretrain' and not has_momentum_keys(sd):
        result.warning(path, 'a pretraining checkpoint without momentum weights (*_m.*)',
                       'the released ALBEF.pth / ALBEF_4M.pth have them; fine-tuning will copy the online weights')
    if keys and len(sd) not in keys:
        what = f'has {len(sd)} state-dict keys; the released {released} has {" or ".join(map(str, keys))}'
        if released and os.path.basename(path) == released:
            result.problem(path, what, f're-download {released} (a different file under the same name?)')
        else:
            result.warning(path, what + ' (fine if this is your own fine-tuned file, e.g. with momentum weights)')
    print(f'checkpoint: {path}: {LAYOUT_HELP[layout]}, {len(sd)} keys')


# ---- a whole cell -----------------------------------------------------------------------------------------------
def check_cell(table, cell, data_root, mode='train', checkpoint=None, images='all', seed=0, trust=False,
               progress=True):
    """Run every check of `cell` in `mode` (train | evaluate) against `data_root`; returns a CheckResult."""
    result = CheckResult()
    steps = cell.steps(mode)
    if not os.path.isdir(data_root):
        result.problem(data_root, '--data_root is not a folder', 'pass the folder that holds the annotation files')
        return result
    # annotation files and image roots of every dataset the steps read
    image_refs_all = []
    for dataset_name in cell.datasets(mode):
        dataset = table.datasets[dataset_name]
        roots = {key: os.path.normpath(os.path.join(data_root, rel))
                 for key, rel in (dataset.get('roots') or {}).items()}
        missing_roots = set()
        for key, root in roots.items():
            if not os.path.isdir(root):
                missing_roots.add(key)
                result.problem(root, f'image/data root ({key}) is not a folder',
                               f'put the {dataset_name} images (or files) there, or pass another --data_root')
        for entry in dataset.get('files') or []:
            path = os.path.normpath(os.path.join(data_root, entry['path']))
            result.files += 1
            refetch = REGENERATE if entry.get('expect') == 'manifest' else REDOWNLOAD
            data = read_annotation(path, entry['format'], result, refetch)
            if data is None:
                continue
            check_counts(entry, data, path, data_root, result)
            if entry['role'] == 'train' and mode == 'evaluate':
                continue  # the script builds every split, but evaluation reads no training image
            if not isinstance(data, list) or entry['format'] not in FIELDS:
                continue
            for item in data:
                for root_key, rel in image_refs(entry['format'], item):
                    if root_key in missing_roots:
                        continue
                    root = roots.get(root_key, '')
                    image_refs_all.append((os.path.join(root, rel) if root else rel, path))
    result.images_skipped = images == 0
    if images != 0 and image_refs_all:
        check_images(image_refs_all, None if images == 'all' else int(images), seed, result, progress)
    # the starting checkpoint(s): every step whose input is a released or user-given file
    for index, step in enumerate(steps):
        role = step.checkpoint
        if role.startswith('step:') or role == 'none':
            continue
        expected = 'pretrain' if role == 'pretrained' or (role == 'optional' and mode == 'train') \
            else TASK_LAYOUT[cell.task]
        released = cell.pretrained if role == 'pretrained' else cell.finetuned if role == 'finetuned' else None
        keys = table.checkpoints.get(released, {}).get('keys') or () if released else ()
        path = checkpoint if (checkpoint and index == 0) else None
        if path is None and released:
            path = released_path(released, data_root)
        if path is None:
            if role == 'optional':
                print(f'checkpoint: none given (optional for {cell.id}: the model starts from random weights)')
            else:
                note = f' ({cell.finetuned_note})' if cell.finetuned_note else ''
                result.problem(f'{cell.id} ({mode})', f'no released {role} checkpoint for this cell{note}',
                               'pass your file with --checkpoint')
            continue
        check_checkpoint(path, expected, result, released, keys, trust, TASK_LAYOUT[cell.task])
    return result


def print_result(cell, mode, data_root, result):
    for finding in result.findings:
        print(finding)
    n_problems, n_warnings = len(result.problems), len(result.findings) - len(result.problems)
    images = ('images not checked (--images 0)' if result.images_skipped else
              f'{result.images_checked} of {result.images_total} images' if result.images_total else 'no images')
    status = 'OK' if result.ok else f'{n_problems} problem(s)'
    print(f'{status}: {cell.id} ({mode}) under {data_root}: {result.files} annotation files, {images}'
          + (f', checkpoint {result.checkpoint}' if result.checkpoint else '')
          + (f'; {n_warnings} warning(s)' if n_warnings else ''))
