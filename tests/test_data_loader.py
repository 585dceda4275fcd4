"""Collate functions (tokenising) and loaders: shapes, per-call-site settings, samplers and seeding."""

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import (
    TEXT_SETTINGS,
    TextBatch,
    UnpaddedDistributedSampler,
    build_collate_fn,
    create_dataset,
    create_loader,
    create_sampler,
    seed_worker,
)
from dataset.collate import TextCollator, VQACollator, pad_to_multiple, tokenize

torch.set_num_threads(1)


class WordTokenizer:
    """Fake tokenizer following the project contract: [CLS]=101 + one id per word, no trailing [SEP], pad 0."""

    pad_token_id = 0

    def __init__(self):
        self.calls = []

    @staticmethod
    def word_id(word):
        return 102 if word == "[SEP]" else 1000 + sum(map(ord, word)) % 5000

    def __call__(self, texts, padding="longest", truncation=False, max_length=None, return_tensors="pt"):
        self.calls.append(dict(padding=padding, truncation=truncation, max_length=max_length))
        rows = [[101] + [self.word_id(w) for w in text.replace("[SEP]", " [SEP] ").split()] for text in texts]
        if truncation:
            rows = [row[:max_length] for row in rows]
        width = max_length if padding == "max_length" else max(len(row) for row in rows)
        ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        return SimpleNamespace(input_ids=ids, attention_mask=mask)


def _words(count):
    return " ".join(f"w{i}" for i in range(count))


def test_fake_tokenizer_follows_the_contract():
    out = WordTokenizer()(["a dog", "a", "yes[SEP]"])
    assert out.input_ids[1].tolist() == [101, WordTokenizer.word_id("a"), 0]
    assert out.attention_mask[1].tolist() == [1, 1, 0]
    assert out.input_ids[2].tolist() == [101, WordTokenizer.word_id("yes"), 102]


def test_pretrain_collate_truncates_at_25_and_pads_longest():
    tokenizer = WordTokenizer()
    collate = build_collate_fn("pretrain", tokenizer)
    image, text = collate([(torch.zeros(3, 4, 4), _words(30)), (torch.ones(3, 4, 4), "short one")])
    assert image.shape == (2, 3, 4, 4)
    assert isinstance(text, TextBatch) and text.input_ids.shape == (2, 25)
    assert text.attention_mask[1].tolist() == [1, 1, 1] + [0] * 22
    assert tokenizer.calls[-1] == dict(padding="longest", truncation=True, max_length=25)
    _, short = collate([(torch.zeros(3, 4, 4), "a b"), (torch.zeros(3, 4, 4), "a")])
    assert short.input_ids.shape == (2, 3)


def test_retrieval_train_collate_never_truncates_and_returns_idx():
    tokenizer = WordTokenizer()
    image, text, idx = build_collate_fn("re", tokenizer)([(torch.zeros(3, 2, 2), _words(30), 4),
                                                           (torch.zeros(3, 2, 2), "x", 0)])
    assert text.input_ids.shape == (2, 31)
    assert idx.tolist() == [4, 0] and idx.dtype == torch.int64
    assert tokenizer.calls[-1]["truncation"] is False


def test_retrieval_eval_collate_has_no_text_and_eval_settings_pad_to_30():
    image, index = build_collate_fn("re", WordTokenizer(), train=False)([(torch.zeros(3, 2, 2), 5),
                                                                         (torch.zeros(3, 2, 2), 6)])
    assert image.shape == (2, 3, 2, 2) and index.tolist() == [5, 6]
    text = tokenize(WordTokenizer(), ["a b", _words(40)], TEXT_SETTINGS["retrieval_eval"])
    assert text.input_ids.shape == (2, 30) and text.attention_mask[0].sum() == 3


def test_vqa_collate_flattens_answers_and_weights():
    tokenizer = WordTokenizer()
    batch = [
        (torch.zeros(3, 2, 2), _words(30), ["yes[SEP]", "no[SEP]"], [0.6, 0.4]),
        (torch.ones(3, 2, 2), "how many", ["two big dogs[SEP]"], [0.5]),
    ]
    image, question, answer, weights, n = build_collate_fn("vqa", tokenizer)(batch)
    assert image.shape == (2, 3, 2, 2)
    assert question.input_ids.shape == (2, 25)
    assert answer.input_ids.shape == (3, 5)
    assert answer.input_ids[0].tolist() == [101, WordTokenizer.word_id("yes"), 102, 0, 0]
    assert weights.dtype == torch.float32 and weights.tolist() == pytest.approx([0.6, 0.4, 0.5])
    assert n == [2, 1]
    assert tokenizer.calls[-1] == dict(padding="longest", truncation=False, max_length=None)


def test_vqa_test_nlvr_ve_grounding_layouts():
    tokenizer = WordTokenizer()
    image, question, qid = build_collate_fn("vqa", tokenizer, train=False)([(torch.zeros(3, 2, 2), _words(40), 9)])
    assert question.input_ids.shape == (1, 41) and qid.tolist() == [9]
    pair = [(torch.zeros(3, 2, 2), torch.ones(3, 2, 2), "two dogs", 1), (torch.zeros(3, 2, 2),
            torch.ones(3, 2, 2), "a cat", 0)]
    image0, image1, text, label = build_collate_fn("nlvr", tokenizer)(pair)
    assert image0.shape == image1.shape == (2, 3, 2, 2) and label.tolist() == [1, 0]
    assert text.input_ids.shape == (2, 3)
    image, text, label = build_collate_fn("ve", tokenizer, train=False)([(torch.zeros(3, 2, 2), "s", 2)])
    assert label.tolist() == [2] and text.input_ids.tolist() == [[101, WordTokenizer.word_id("s")]]
    image, text, ref_id = build_collate_fn("grounding", tokenizer, train=False)([(torch.zeros(3, 2, 2), "s", 77)])
    assert ref_id.tolist() == [77]


def test_pad_to_multiple_pads_but_never_truncates():
    tokenizer = WordTokenizer()
    collate = build_collate_fn("re", tokenizer, pad_to_multiple_of=8)
    _, text, _ = collate([(torch.zeros(3, 2, 2), "a b c", 0)])
    assert text.input_ids.shape == (1, 8) and text.attention_mask.sum() == 4
    _, text, _ = collate([(torch.zeros(3, 2, 2), _words(29), 0)])
    assert text.input_ids.shape == (1, 32) and text.attention_mask.sum() == 30
    same = pad_to_multiple(TextBatch(torch.ones(2, 16, dtype=torch.long), torch.ones(2, 16, dtype=torch.long)), 8)
    assert same.input_ids.shape == (2, 16)


def test_fixed_length_pads_truncated_sites_to_25():
    collate = build_collate_fn("pretrain", WordTokenizer(), fixed_length=True)
    _, text = collate([(torch.zeros(3, 2, 2), "a b")])
    assert text.input_ids.shape == (1, 25) and text.attention_mask.sum() == 3
    _, question, answer, _, _ = build_collate_fn("vqa", WordTokenizer(), fixed_length=True)(
        [(torch.zeros(3, 2, 2), "q", ["a[SEP]"], [1.0])]
    )
    assert question.input_ids.shape == (1, 25) and answer.input_ids.shape == (1, 3)


def test_text_batch_moves_and_collators_pickle():
    import pickle

    batch = TextBatch(torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long)).to("cpu")
    assert batch.input_ids.device.type == "cpu"
    collator = pickle.loads(pickle.dumps(TextCollator(WordTokenizer(), text_positions=(1,))))
    assert collator([(torch.zeros(1), "a")])[1].input_ids.shape == (1, 2)
    assert isinstance(pickle.loads(pickle.dumps(VQACollator(WordTokenizer()))), VQACollator)
    with pytest.raises(ValueError, match="unknown task"):
        build_collate_fn("caption", WordTokenizer())


def _write_retrieval(tmp_path, count=10):
    for i in range(count):
        Image.new("RGB", (20, 14), (i * 20, 0, 0)).save(tmp_path / f"{i}.png")
    train = [{"image": f"{i}.png", "caption": f"Image number {i}, {_words(i)}.", "image_id": i // 2}
             for i in range(count)]
    evaluation = [{"image": f"{i}.png", "caption": [f"first {i}", f"second {i}"]} for i in range(3)]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    return {"train_file": [str(tmp_path / "train.json")], "val_file": str(tmp_path / "eval.json"),
            "test_file": str(tmp_path / "eval.json"), "image_root": str(tmp_path), "image_res": 16}


def test_end_to_end_retrieval_loaders(tmp_path):
    train, val, test = create_dataset("re", _write_retrieval(tmp_path))
    samplers = create_sampler([train], [True], num_tasks=1, global_rank=0) + [None, None]
    tokenizer = WordTokenizer()
    loaders = create_loader([train, val, test], samplers, batch_size=[4, 2, 2], num_workers=[0, 0, 0],
                            is_trains=[True, False, False],
                            collate_fns=[build_collate_fn("re", tokenizer), None, None], seed=0)
    train_batches = list(loaders[0])
    assert len(train_batches) == 2
    image, text, idx = train_batches[0]
    assert image.shape == (4, 3, 16, 16) and text.input_ids.shape[0] == 4 and idx.shape == (4,)
    assert text.input_ids[:, 0].tolist() == [101] * 4
    val_batches = list(loaders[1])
    assert [batch[1].tolist() for batch in val_batches] == [[0, 1], [2]]


def test_loader_seed_fixes_shuffle_order(tmp_path):
    train, _, _ = create_dataset("re", _write_retrieval(tmp_path))
    collate = build_collate_fn("re", WordTokenizer())

    def order(seed):
        loader = create_loader([train], [None], 2, 0, [True], [collate], seed=seed)[0]
        return [text.input_ids[:, 3].tolist() for _, text, _ in loader]

    assert order(3) == order(3)
    assert any(order(3) != order(seed) for seed in (4, 5, 6))


def test_loader_with_a_worker_runs_and_reports_empty_train_splits(tmp_path):
    train, val, _ = create_dataset("re", _write_retrieval(tmp_path, count=4))
    loader = create_loader([train], [None], 2, 1, [True], [build_collate_fn("re", WordTokenizer())], seed=1)[0]
    assert loader.persistent_workers and loader.drop_last
    assert sum(batch[0].shape[0] for batch in loader) == 4
    with pytest.raises(ValueError, match="no batch"):
        create_loader([train], [None], 8, 0, [True], [None])
    assert create_loader([None, val], [None, None], 2, 0, [True, False], [None, None])[0] is None


def test_samplers_shuffle_train_and_split_eval_without_padding():
    data = list(range(10))
    train_sampler, eval_sampler = create_sampler([data, data], [True, False], num_tasks=3, global_rank=1)
    assert len(train_sampler) == 4 and train_sampler.shuffle
    assert isinstance(eval_sampler, UnpaddedDistributedSampler)
    seen = []
    for rank in range(3):
        sampler = create_sampler([data], [False], num_tasks=3, global_rank=rank)[0]
        assert len(list(sampler)) == len(sampler)
        seen += list(sampler)
    assert sorted(seen) == data
    padded = create_sampler([data], [False], num_tasks=3, global_rank=2, pad_eval=True)[0]
    assert len(padded) == 4
    assert create_sampler([None], [True], 1, 0) == [None]


def test_seed_worker_seeds_numpy_and_random_from_torch():
    torch.manual_seed(1234)
    seed_worker(0)
    drawn = (np.random.random(), random.random())
    np.random.seed(1234)
    random.seed(1234)
    assert drawn == (np.random.random(), random.random())


@pytest.mark.parametrize("task, train, item", [
    ("nlvr", True, (torch.zeros(3, 2, 2), torch.zeros(3, 2, 2), None, 1)),
    ("nlvr", False, (torch.zeros(3, 2, 2), torch.zeros(3, 2, 2), None, 0)),
    ("ve", True, (torch.zeros(3, 2, 2), None, 2)),
    ("ve", False, (torch.zeros(3, 2, 2), None, 1)),
    ("grounding", True, (torch.zeros(3, 2, 2), None, 3)),
    ("grounding", False, (torch.zeros(3, 2, 2), None, 77)),
    ("vqa", False, (torch.zeros(3, 2, 2), None, 5)),
])
def test_compile_buckets_every_untruncated_text_to_multiples_of_8(task, train, item):
    """Under `compile: true` the NLVR2 / VE / grounding / VQA-eval texts (never truncated officially) are padded to
    a multiple of 8 with masked [PAD]s: the same tokens, no truncation, few shapes."""
    from dataset import static_shape_options
    tokenizer = WordTokenizer()
    pos = item.index(None)
    batch = [item[:pos] + (text,) + item[pos + 1:] for text in ("a b c", _words(40))]
    plain = build_collate_fn(task, tokenizer, train=train)(batch)[pos]
    static = build_collate_fn(task, tokenizer, train=train, **static_shape_options({"compile": True}))(batch)[pos]
    length = plain.input_ids.shape[1]
    assert length == 41 and static.input_ids.shape == (2, 48)  # 41 tokens kept, bucketed up
    assert torch.equal(static.input_ids[:, :length], plain.input_ids)
    assert torch.equal(static.attention_mask[:, :length], plain.attention_mask)
    assert static.attention_mask[:, length:].sum() == 0 and (static.input_ids[:, length:] == 0).all()
