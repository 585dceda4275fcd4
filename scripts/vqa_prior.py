"""Image-blind VQA reference without a model: the question-kind prior of docs/README_vqa.md.

Each question's kind is its first N words (default 3, lower-cased); the prior answers every test question with the
most frequent training answer of its kind (over all ten human answers; the most frequent answer overall for a kind
never seen in training). Prints its VQA accuracy beside always giving the most common answer.

    python scripts/vqa_prior.py --train data/synthetic/vqa_train.json --test data/synthetic/vqa_test.json \
        [--model_result output/demo/vqa/metrics.json]   # also prints the model's accuracy beside them
        [--blind_result output/demo/vqa_blind/metrics.json]   # and the same model's with one fixed picture
"""
import argparse
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluation.vqa_eval import ground_truth_answers, normalize_answer, vqa_accuracy  # noqa: E402


def question_kind(question, words=3):
    return ' '.join(question.lower().split()[:words])


def answers_of(item):
    return item['answer'] if isinstance(item['answer'], list) else [item['answer']]


def kind_prior(train, words=3):
    """({kind: answer}, overall answer): the most frequent normalised training answer per question kind."""
    per_kind, overall = collections.defaultdict(collections.Counter), collections.Counter()
    for item in train:
        answers = [normalize_answer(a) for a in answers_of(item)]
        per_kind[question_kind(item['question'], words)].update(answers)
        overall.update(answers)
    return {kind: counts.most_common(1)[0][0] for kind, counts in per_kind.items()}, overall.most_common(1)[0][0]


def prior_accuracy(train, test, words=3):
    """{'kind_prior': %, 'most_common': %, 'questions': n} on the test questions that carry answers."""
    prior, majority = kind_prior(train, words)
    truth = ground_truth_answers(test)
    scored = [item for item in test if int(item['question_id']) in truth]
    kind = [vqa_accuracy(prior.get(question_kind(i['question'], words), majority), truth[int(i['question_id'])])
            for i in scored]
    common = [vqa_accuracy(majority, truth[int(i['question_id'])]) for i in scored]
    return {'kind_prior': 100.0 * sum(kind) / len(kind), 'most_common': 100.0 * sum(common) / len(common),
            'most_common_answer': majority, 'questions': len(scored)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--train', nargs='+', required=True, help='VQA training file(s)')
    p.add_argument('--test', required=True, help='VQA test file with answers')
    p.add_argument('--words', type=int, default=3, help='question kind = its first WORDS words')
    p.add_argument('--limit', type=int, default=None, help='only the first LIMIT test questions')
    p.add_argument('--model_result', default=None, help="a VQA.py metrics.json on the same test file, printed beside")
    p.add_argument('--blind_result', default=None,
                   help="the metrics.json of the same model evaluated with image_blind=fixed (VQA.py --evaluate "
                        "--opt image_blind=fixed), printed beside")
    args = p.parse_args(argv)
    train = [item for path in args.train for item in json.load(open(path))]
    test = json.load(open(args.test))[:args.limit]
    result = prior_accuracy(train, test, args.words)
    if args.model_result:
        with open(args.model_result) as f:
            result['model'] = json.load(f)['metrics']['test_vqa_acc']
        blind = ''
        if args.blind_result:
            with open(args.blind_result) as f:
                result['model_blind'] = json.load(f)['metrics']['test_vqa_acc']
            blind = f"the same model shown one fixed picture {result['model_blind']:.1f}, "
        print(f"VQA local accuracy on {result['questions']} test questions: model {result['model']:.1f}; image-blind "
              f"references: {blind}question-kind prior {result['kind_prior']:.1f}, always "
              f"\"{result['most_common_answer']}\" {result['most_common']:.1f}")
    else:
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}))
    return result


if __name__ == '__main__':
    main()
