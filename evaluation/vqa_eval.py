"""VQA prediction over an answer list, result-file checks and the standard VQA accuracy.

Accuracy of one prediction = mean over the 10 leave-one-annotator-out subsets of min(#matching humans / 3, 1),
after the standard answer normalisation (punctuation, number words to digits, articles, contractions). Unlike the
server script, which normalises only when the humans disagree, the prediction and every human answer are always
normalised the same way; answers drawn from a normalised answer list score identically under both rules.
"""
import itertools
import re

import torch
from tqdm import tqdm

NUMBER_WORDS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5',
                'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
ARTICLES = frozenset({'a', 'an', 'the'})
# Split on the apostrophe-free spelling. Forms whose apostrophe-free spelling is an ordinary word
# (its, well, were, hell, shell, wed, ill, id, shed, lets ...) are left alone.
_CONTRACTIONS = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll ma'am mightn't
mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd've she's should've
shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll
they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've
who'd who'd've who'll who're who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll
y'all'd've you'd you'd've you'll you're you've""".split()
PUNCTUATION = (';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',', '?',
               '!')
_DIGIT_COMMA_DIGIT = re.compile(r'(\d)(,)(\d)')
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r'\.(?!\d)')


def _contraction_map():
    """Every spelling with some apostrophes dropped -> the full contraction (e.g. couldnt've, couldn'tve)."""
    mapping = {}
    for word in _CONTRACTIONS:
        parts = word.split("'")
        for keep in itertools.product((False, True), repeat=len(parts) - 1):
            if all(keep):
                continue
            spelled = parts[0] + ''.join(("'" if k else '') + p for k, p in zip(keep, parts[1:]))
            mapping.setdefault(spelled, word)
    return mapping


CONTRACTIONS = _contraction_map()


def strip_punctuation(text):
    """Remove punctuation (or turn it into a space when it glues two words) and sentence periods."""
    out = text
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        if has_digit_comma or p + ' ' in text or ' ' + p in text:
            out = out.replace(p, '')
        else:
            out = out.replace(p, ' ')
    return _PERIOD_NOT_BEFORE_DIGIT.sub('', out)


def normalize_words(text):
    """Lower-case words, number words to digits, articles dropped, contractions restored."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return ' '.join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text):
    """The standard VQA answer normalisation of one answer string."""
    text = text.replace('\n', ' ').replace('\t', ' ').strip()
    return normalize_words(strip_punctuation(text))


def vqa_accuracy(prediction, human_answers):
    """Accuracy in [0, 1] of one predicted answer against the humans' answers (usually 10)."""
    if not human_answers:
        raise ValueError('vqa_accuracy needs at least one human answer')
    pred = normalize_answer(prediction)
    humans = [normalize_answer(a) for a in human_answers]
    if len(humans) == 1:
        return float(min(1.0, (humans[0] == pred) / 3))
    total = 0.0
    for left_out in range(len(humans)):
        matches = sum(1 for i, a in enumerate(humans) if i != left_out and a == pred)
        total += min(1.0, matches / 3)
    return total / len(humans)


def ground_truth_answers(annotations):
    """{question_id: [human answers]} for the items that carry a list of answers (empty for a real test split)."""
    return {int(a['question_id']): list(a['answer']) for a in annotations
            if 'question_id' in a and isinstance(a.get('answer'), list)}


def score_results(results, ground_truth):
    """Mean accuracy (%) of a result list over the questions that have ground truth, and the count scored."""
    scored = [vqa_accuracy(r['answer'], ground_truth[r['question_id']]) for r in results
              if r['question_id'] in ground_truth]
    if not scored:
        return {}
    return {'vqa_acc': 100.0 * sum(scored) / len(scored), 'vqa_scored': len(scored)}


def most_common_answer_accuracy(ground_truth, train_answers):
    """Accuracy (%) of always answering the most frequent training answer: the floor a model must beat."""
    counts = {}
    for answer in train_answers:
        counts[answer] = counts.get(answer, 0) + 1
    majority = max(counts, key=counts.get)
    return majority, 100.0 * sum(vqa_accuracy(majority, a) for a in ground_truth.values()) / len(ground_truth)


def check_results(results, question_ids):
    """Raise unless every expected question id appears exactly once and nothing else appears."""
    got = [r['question_id'] for r in results]
    duplicates = len(got) - len(set(got))
    missing = set(question_ids) - set(got)
    extra = set(got) - set(question_ids)
    if duplicates or missing or extra:
        raise ValueError(f'VQA result has {duplicates} duplicate, {len(missing)} missing and {len(extra)} unknown '
                         f'question ids (e.g. missing {sorted(missing)[:5]}); the evaluation server rejects it')


def dedup_results(results):
    """Keep the first result of every question id, sorted by question id (sampler padding repeats some)."""
    seen = {}
    for r in results:
        seen.setdefault(int(r['question_id']), r)
    return [seen[q] for q in sorted(seen)]


@torch.no_grad()
def predict_answers(model, loader, answer_list, tokenizer, device, k, eos='[SEP]', show_progress=True):
    """[{'question_id', 'answer'}] for every (image, question, question_id) batch of `loader`.

    The answer list is tokenised once (each answer + eos, padded to the longest) and ranked by
    `model(image, question, answers, train=False, k=k)`; the prediction is the highest-probability answer.
    """
    model.eval()
    answers = tokenizer([a + eos for a in answer_list], padding='longest', return_tensors='pt').to(device)
    results = []
    for image, question, question_id in tqdm(loader, desc='vqa predict', disable=not show_progress,
                                             dynamic_ncols=True):
        topk_ids, topk_probs = model(image.to(device, non_blocking=True), question.to(device), answers,
                                     train=False, k=k)
        best = topk_ids.gather(1, topk_probs.argmax(dim=1, keepdim=True)).squeeze(1)
        for qid, idx in zip(question_id.tolist(), best.tolist()):
            results.append({'question_id': int(qid), 'answer': answer_list[idx]})
    return results
