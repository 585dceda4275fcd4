"""The demo's closing table: every task's number beside its image-blind control (docs/README_synthetic.md).

Reads the run folders that scripts/demo.sh writes under OUT (a task whose folder is missing is left out) and prints,
per task, the metric with the pictures, the same fine-tuned model evaluated with one fixed picture for every item
(`--opt image_blind=fixed`: what the model gets from the text alone) and the references that need no model.

    python scripts/demo_report.py --out output/demo --root data/synthetic
"""
import argparse
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.vqa_prior import prior_accuracy  # noqa: E402


def read_metrics(folder):
    """metrics.json of a run folder ({} when the run is missing)."""
    path = os.path.join(folder, 'metrics.json')
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def last_epoch(folder):
    """The last epoch record of a run's log.txt ({} when missing)."""
    path = os.path.join(folder, 'log.txt')
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        records = [json.loads(line) for line in f if line.startswith('{')]
    return records[-1] if records else {}


def load(root, name):
    with open(os.path.join(root, name)) as f:
        return json.load(f)


def majority(items):
    """Share of the most frequent label, in %."""
    counts = collections.Counter(str(item['label']) for item in items)
    return 100.0 * max(counts.values()) / sum(counts.values())


def pair(a, b, scale=1.0, digits=1):
    return f'{a * scale:.{digits}f} / {b * scale:.{digits}f}'


def rows(out, root):
    """(task, metric, with pictures, image-blind control, other references) of every run found under `out`."""
    table = []
    chance = 100.0 / len(load(root, 'retrieval_test.json'))
    pretrain = last_epoch(os.path.join(out, 'pretrain'))
    if 'zeroshot_txt_r1' in pretrain:
        table.append(('pretraining, zero-shot (ITC only)', 'test TR@1 / IR@1',
                      pair(pretrain['zeroshot_txt_r1'], pretrain['zeroshot_img_r1']), f'chance {chance:.1f}', ''))
    for folder, task in (('retrieval_zeroshot', 'retrieval zero-shot, ITM re-ranked'),
                         ('retrieval', 'retrieval fine-tuned, ITM re-ranked')):
        test = read_metrics(os.path.join(out, folder)).get('test')
        if test:
            table.append((task, 'test TR@1 / IR@1', pair(test['txt_r1'], test['img_r1']),
                          f'chance {chance:.1f}', ''))
    vqa, vqa_blind = read_metrics(os.path.join(out, 'vqa')), read_metrics(os.path.join(out, 'vqa_blind'))
    if vqa:
        prior = prior_accuracy(load(root, 'vqa_train.json'), load(root, 'vqa_test.json'))
        blind = f"{vqa_blind['metrics']['test_vqa_acc']:.1f}" if vqa_blind else 'not run'
        table.append(('VQA', 'test accuracy', f"{vqa['metrics']['test_vqa_acc']:.1f}", blind,
                      f"question-kind prior {prior['kind_prior']:.1f}, always \"{prior['most_common_answer']}\" "
                      f"{prior['most_common']:.1f}"))
    for name, task, files in (('ve', 'SNLI-VE', ('ve_dev.json', 've_test.json')),
                              ('nlvr', 'NLVR2', ('nlvr_dev.json', 'nlvr_test.json'))):
        run, blind = read_metrics(os.path.join(out, name)), read_metrics(os.path.join(out, f'{name}_blind'))
        if run:
            m = run['metrics']
            control = pair(blind['metrics']['val_acc'], blind['metrics']['test_acc'], 100) if blind else 'not run'
            table.append((task, 'dev / test accuracy', pair(m['val_acc'], m['test_acc'], 100), control,
                          'majority ' + pair(*(majority(load(root, f)) for f in files))))
    grounding, blind = read_metrics(os.path.join(out, 'grounding')), read_metrics(os.path.join(out, 'grounding_blind'))
    if grounding:
        splits = ('val_d', 'testA_d', 'testB_d')
        show = lambda values: ' / '.join(f'{100 * values[k]:.1f}' for k in splits)  # noqa: E731
        table.append(('grounding (ITM Grad-CAM)', 'val / testA / testB accuracy', show(grounding['accuracy']),
                      show(blind['accuracy']) if blind else 'not run',
                      'random proposal ' + show(grounding['random_proposal'])))
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='output/demo', help='the demo output folder (DEMO_OUT of scripts/demo.sh)')
    p.add_argument('--root', default='data/synthetic', help='the synthetic world')
    args = p.parse_args(argv)
    table = rows(args.out, args.root)
    header = ('task', 'metric', 'with the pictures', 'image-blind control', 'other references')
    widths = [max(len(str(r[i])) for r in [header, *table]) for i in range(len(header))]
    for r in [header, tuple('-' * w for w in widths), *table]:
        print('  '.join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    print('image-blind control: the same fine-tuned model evaluated with one fixed picture for every item '
          '(--opt image_blind=fixed); for retrieval, chance')
    return table


if __name__ == '__main__':
    main()
