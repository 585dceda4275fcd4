"""VLMo fine-tuning through the shared entry scripts VQA.py and NLVR.py (registered in models/registry.py).

VQA (spec VLMo.md 7.2, 13.2, 14.2): the model is a classifier over an answer vocabulary of `vqa_num_labels` answers,
the config's `answer_list` file (its length must equal `vqa_num_labels`). The shared VQA training batch
(dataset/collate.py: image, question, answers + eos tokenised and flattened, vote shares, answers per question) is
turned into VLMo's dense soft targets by `VQATargets`:
- an answer's label is found by its token ids (the answer list is tokenised the way the collate tokenises the
  answers: answer + eos, no truncation), so the match goes through the uncased tokenizer (case-insensitive) and two
  raw spellings with the same ids count as one answer;
- its annotator count m is its vote share x 10 (VQA v2 and the synthetic world have 10 answers per question), summed
  over spellings of the same label; score 0.3 / 0.6 / 0.9 / 1.0 for m = 1 / 2 / 3 / >= 4;
- a Visual Genome item (`dataset: vg`, dropped by spec 13.2) is recognised exactly: one answer of weight 0.5, which a
  VQA item cannot have (its only distinct answer has share 1); VG items and questions without any in-vocabulary
  answer are left out of the step's loss (dropped from training per 13.2, at the batch instead of the file, so a
  step sees fewer than batch_size_train questions when the batch holds some).
Prediction: argmax over the classifier -> the answer string of the list.

NLVR2 (spec 7.3, 14.3): `VLMoNLVRFinetune.forward` has the ALBEF NLVR model's call signature `(image, text, targets,
alpha, train)` with `image` the two images concatenated along the batch ([image0; image1], 2B, as NLVR.py's
`pair_batch` builds it), so the shared training step and the accuracy of evaluation/classification.py run
unchanged; inside it is `compute_nlvr2` (pass 1 with image 0 and modality row 1, pass 2 with image 1 and row 2).

Both models convert the shared pipeline's texts to VLMo's fixed-length `[CLS] ... [SEP]` (`VLMo.fixed_length`) and run
through their forward, so a DistributedDataParallel wrapper sees every training pass.
"""
import json

import torch
from tqdm import tqdm

from dataset.collate import TEXT_SETTINGS, TextBatch, tokenize

from .vlmo import VLMoNLVR, VLMoVQA

ANSWERS_PER_QUESTION = 10           # VQA v2 (and the synthetic world): 10 human answers per question
VG_ANSWER_WEIGHT = 0.5              # dataset/vqa_dataset.py: the single answer of a Visual Genome item
SCORES = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9}  # m >= 4: 1.0 (spec 7.2; the official get_score)


def answer_score(count):
    """VQA target score of an answer given by `count` annotators: 0 / 0.3 / 0.6 / 0.9 / 1.0 for 0 / 1 / 2 / 3 / >= 4."""
    return SCORES.get(int(count), 1.0) if count > 0 else 0.0


def check_vocabulary(config, answer_list):
    """Refuse an answer list whose length is not the classifier's size `vqa_num_labels`."""
    labels = int(config.get('vqa_num_labels', 3129))
    if len(answer_list) != labels:
        raise ValueError(f"VLMo VQA: the config key vqa_num_labels = {labels} but the answer list "
                         f"{config.get('answer_list')!r} (config key answer_list) has {len(answer_list)} answers; "
                         f"the classifier has one output per answer: set vqa_num_labels: {len(answer_list)} or use "
                         f"an answer list of {labels} answers")


def read_answer_list(config):
    """The config's answer list (a JSON list of strings), checked against `vqa_num_labels`."""
    path = config.get('answer_list')
    if not path:
        raise KeyError('VLMo VQA needs the config key answer_list (the answer vocabulary, a JSON list of strings)')
    with open(path) as f:
        answers = json.load(f)
    check_vocabulary(config, answers)
    return answers


class VQATargets:
    """Dense [B, C] soft targets of the shared VQA training batch (see the module docstring)."""

    def __init__(self, answer_list, tokenizer, eos='[SEP]'):
        ids = tokenize(tokenizer, [a + eos for a in answer_list], TEXT_SETTINGS['vqa_answer'])
        self.num_labels = len(answer_list)
        self.label_of = {}
        for label, (row, mask) in enumerate(zip(ids.input_ids.tolist(), ids.attention_mask.tolist())):
            self.label_of.setdefault(tuple(i for i, m in zip(row, mask) if m), label)  # first of equal spellings

    def __call__(self, answers, weights, n):
        """(targets [B, C] float, keep [B] bool: the questions trained on) from the batch's answers (TextBatch of the
        flattened answers), their weights [sum n] and the answers per question `n`."""
        rows = answers.input_ids.tolist()
        masks = answers.attention_mask.tolist()
        weights = weights.tolist()
        targets = torch.zeros(len(n), self.num_labels)
        keep = torch.zeros(len(n), dtype=torch.bool)
        start = 0
        for b, count in enumerate(n):
            span = range(start, start + count)
            start += count
            if count == 1 and abs(weights[span[0]] - VG_ANSWER_WEIGHT) < 1e-6:
                continue  # a Visual Genome item (spec 13.2 drops them)
            votes = {}
            for j in span:
                label = self.label_of.get(tuple(i for i, m in zip(rows[j], masks[j]) if m))
                if label is not None:
                    votes[label] = votes.get(label, 0) + round(weights[j] * ANSWERS_PER_QUESTION)
            for label, m in votes.items():
                targets[b, label] = answer_score(m)
            keep[b] = bool(votes)
        return targets, keep


class VLMoVQAFinetune(VLMoVQA):
    """VLMo's VQA classifier with a forward for the entry script: train -> the BCE loss (`compute_vqa`), else the
    [B, C] logits."""

    def forward(self, image, text, targets=None, train=True, **unused):
        ids, mask = self.fixed_length(text)
        if train:
            return self.compute_vqa(image, ids, mask, targets.to(image.device))['vqa_loss']
        return self.vqa_classifier(self.infer(ids, mask, image)['cls_feats'])


class VLMoNLVRFinetune(VLMoNLVR):
    """VLMo's NLVR2 model with the ALBEF NLVR model's call signature (see the module docstring)."""

    def forward(self, image, text, targets, alpha=0.0, train=True, **unused):
        image0, image1 = torch.split(image, targets.size(0))
        ids, mask = self.fixed_length(text)
        out = self.compute_nlvr2(image0, image1, ids, mask, targets)
        return out['nlvr2_loss'] if train else out['nlvr2_logits']


def make_vqa_step(config, device):
    """VQA.py's training step for VLMo: soft targets from the batch, questions without a target left out, the loss
    of the model's forward. Refuses an answer list whose length is not `vqa_num_labels`."""
    from models.tokenization import build_tokenizer
    answer_list = read_answer_list(config)
    # the answers' ids only need the vocabulary, which every text encoder of the project shares (bert-base-uncased)
    targets_of = VQATargets(answer_list, build_tokenizer(config.get('text_encoder') or 'bert-base-uncased'),
                            config.get('eos', '[SEP]'))

    def step(model, batch, alpha):
        image, question, answers, weights, n = batch
        targets, keep = targets_of(answers, weights, n)
        scale = 1.0
        if not bool(keep.any()):  # nothing to learn from: a zero loss over the whole batch keeps every rank in step
            keep[:], scale = True, 0.0
        keep_dev = keep.to(image.device)
        text = TextBatch(question.input_ids[keep_dev], question.attention_mask[keep_dev])
        loss = model(image[keep_dev], text, targets=targets[keep], train=True)
        return {'loss': loss * scale}
    return step


@torch.no_grad()
def evaluate_vqa(model, loader, tokenizer, device, config, show_progress=False):
    """[{'question_id', 'answer'}] for this rank's test questions: argmax of the classifier -> answer string."""
    answer_list = loader.dataset.answer_list
    check_vocabulary(config, answer_list)
    model.eval()
    results = []
    for image, question, question_id in tqdm(loader, desc='vqa predict', disable=not show_progress,
                                             dynamic_ncols=True):
        logits = model(image.to(device, non_blocking=True), question.to(device), train=False)
        for qid, idx in zip(question_id.tolist(), logits.argmax(dim=1).tolist()):
            results.append({'question_id': int(qid), 'answer': answer_list[idx]})
    return results
