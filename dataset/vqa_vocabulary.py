"""VLMo's VQA v2 answer vocabulary and its held-out `rest_val` split, built from this codebase's VQA JSON files
(VLMo.md section 13.2; docs/README_vlmo.md, "VQA answer vocabulary").

The official vocabulary (3,129 answers) holds the normalised *major* answer of each VQA question (the annotation
files' `multiple_choice_answer`) that occurs at least 9 times over train + val, in order of first occurrence; the
normalisation is the standard VQA evaluation one (evaluation/vqa_eval.normalize_answer: punctuation, number words,
articles, contractions). An item that carries `multiple_choice_answer` (converted from the official annotations) uses
it; an ALBEF item (`answer`: its 10 raw answers) uses the most frequent of them, ties to the first given (the spec's
documented approximation). Visual Genome items (`dataset: vg`) are not VQA v2 and are left out everywhere.

Training = train + val minus the questions of 1,000 held-out val pictures (`rest_val`; official: the last 1,000 of a
randomly shuffled list; here the sorted val pictures shuffled by `random.Random(seed)`, last N, and the list is
written out so that it is recorded), with the questions that have no answer in the vocabulary dropped (a raw answer
string counts when it is in the vocabulary, as the official labels are made). `rest_val` keeps all its questions.

    python -m dataset.vqa_vocabulary --train data/vqa_train.json --val data/vqa_val.json --out_dir data/vlmo_vqa

writes `answer_list.json` (the vocabulary: `answer_list` of configs/vlmo/VQA.yaml), `vqa_trainval.json` (its
`train_file`), `vqa_rest_val.json` (a `test_file` for local accuracy) and `rest_val_images.json`, and prints the
counts; a vocabulary size other than `--expect` (3,129 for the official files) is reported.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys

from evaluation.vqa_eval import normalize_answer

OFFICIAL_SIZE = 3129
MIN_COUNT = 9
REST_VAL_IMAGES = 1000


def is_vqa(item: dict) -> bool:
    """A VQA v2 question (Visual Genome items of ALBEF's files are `dataset: vg`)."""
    return item.get('dataset', 'vqa') != 'vg'


def raw_answers(item: dict) -> list[str]:
    answers = item.get('answer', [])
    return [answers] if isinstance(answers, str) else list(answers)


def major_answer(item: dict) -> str:
    """The item's normalised major answer: `multiple_choice_answer` if present, else the most frequent raw answer
    (ties: the first given)."""
    if item.get('multiple_choice_answer') is not None:
        return normalize_answer(item['multiple_choice_answer'])
    answers = raw_answers(item)
    if not answers:
        raise ValueError(f"VQA question {item.get('question_id')!r} has no answers: it cannot give a major answer")
    counts = collections.Counter(answers)
    best = max(counts.values())
    return normalize_answer(next(a for a in answers if counts[a] == best))


def build_vocabulary(items: list[dict], min_count: int = MIN_COUNT) -> list[str]:
    """Major answers occurring >= min_count times over `items` (VQA questions only), in order of first occurrence."""
    majors = [major_answer(item) for item in items if is_vqa(item)]
    counts = collections.Counter(majors)
    return [a for a in dict.fromkeys(majors) if counts[a] >= min_count]


def rest_val_images(val_items: list[dict], n: int = REST_VAL_IMAGES, seed: int = 0) -> list[str]:
    """The held-out val pictures: the sorted distinct pictures of the val questions, shuffled by Random(seed),
    the last n."""
    images = sorted({item['image'] for item in val_items if is_vqa(item)})
    if n > len(images):
        raise ValueError(f'rest_val needs {n} val pictures, the val file has {len(images)}: give a smaller --rest_val')
    random.Random(seed).shuffle(images)
    return images[len(images) - n:] if n else []


def has_answer_in(item: dict, vocabulary: set[str]) -> bool:
    return any(a in vocabulary for a in raw_answers(item))


def build(train_items: list[dict], val_items: list[dict], min_count: int = MIN_COUNT, rest_val: int = REST_VAL_IMAGES,
          seed: int = 0) -> dict:
    """{'answer_list', 'trainval', 'rest_val', 'rest_val_images', 'dropped'}: the vocabulary over train + val, the
    training questions (train + val minus rest_val pictures, without VG and without in-vocabulary answers), the
    rest_val questions, its pictures, and the number of questions dropped for having no answer in the vocabulary."""
    vocabulary = build_vocabulary(train_items + val_items, min_count)
    held = rest_val_images(val_items, rest_val, seed)
    held_set, known = set(held), set(vocabulary)
    candidates = [item for item in train_items if is_vqa(item)] + \
                 [item for item in val_items if is_vqa(item) and item['image'] not in held_set]
    trainval = [item for item in candidates if has_answer_in(item, known)]
    return {'answer_list': vocabulary, 'trainval': trainval,
            'rest_val': [item for item in val_items if is_vqa(item) and item['image'] in held_set],
            'rest_val_images': held, 'dropped': len(candidates) - len(trainval)}


def _read(path: str) -> list[dict]:
    try:
        with open(path) as f:
            items = json.load(f)
    except FileNotFoundError:
        raise SystemExit(f'{path} does not exist: give the VQA JSON files of data/ (README, "Data")') from None
    except json.JSONDecodeError as err:
        raise SystemExit(f'{path} is not valid JSON ({err}): give a VQA file of this codebase\'s format') from None
    if not isinstance(items, list) or not all(isinstance(i, dict) and 'image' in i for i in items):
        raise SystemExit(f'{path}: expected a JSON list of VQA items with "image", "question" and "answer"')
    return items


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="VLMo's VQA answer vocabulary and rest_val split (VLMo.md 13.2)")
    parser.add_argument('--train', nargs='+', required=True, help='VQA training JSON file(s) (VG items are skipped)')
    parser.add_argument('--val', nargs='+', required=True, help='VQA val JSON file(s)')
    parser.add_argument('--out_dir', required=True)
    parser.add_argument('--min_count', type=int, default=MIN_COUNT)
    parser.add_argument('--rest_val', type=int, default=REST_VAL_IMAGES, help='held-out val pictures')
    parser.add_argument('--seed', type=int, default=0, help='the shuffle that picks the rest_val pictures')
    parser.add_argument('--expect', type=int, default=OFFICIAL_SIZE,
                        help='the vocabulary size to check (3,129 for the official VQA v2 files; 0: no check)')
    args = parser.parse_args(argv)
    train = [item for path in args.train for item in _read(path)]
    val = [item for path in args.val for item in _read(path)]
    out = build(train, val, args.min_count, args.rest_val, args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    for name in ('answer_list', 'trainval', 'rest_val', 'rest_val_images'):
        file = os.path.join(args.out_dir, f'{name}.json' if name in ('answer_list', 'rest_val_images')
                            else f'vqa_{name}.json')
        tmp = file + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(out[name], f)
        os.replace(tmp, file)
    print(f"vocabulary: {len(out['answer_list'])} answers (major answers seen >= {args.min_count} times); training: "
          f"{len(out['trainval'])} questions ({out['dropped']} without an in-vocabulary answer dropped); rest_val: "
          f"{len(out['rest_val'])} questions of {len(out['rest_val_images'])} pictures; written to {args.out_dir}")
    if args.expect and len(out['answer_list']) != args.expect:
        print(f"note: the official vocabulary has {args.expect} answers and this one {len(out['answer_list'])}: set "
              f"vqa_num_labels: {len(out['answer_list'])} in the config, or build from the official annotation files "
              f"(items with multiple_choice_answer)", file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
