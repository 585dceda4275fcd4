"""Task datasets and create_dataset, built from JSON files and tiny images in tmp_path."""

import json
import random

import pytest
import torch
from PIL import Image

from dataset import DatasetSplits, create_dataset
from dataset.caption_dataset import pretrain_dataset, re_eval_dataset, re_train_dataset
from dataset.grounding_dataset import grounding_dataset
from dataset.nlvr_dataset import nlvr_dataset
from dataset.ve_dataset import ve_dataset
from dataset.vqa_dataset import vqa_dataset

torch.set_num_threads(1)


def _image(path, color=(10, 20, 30), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 9), color).save(path, format=fmt)
    return path


def _json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def _pixel(image):
    """Identity 'transform' that keeps the top-left colour, so tests can tell images apart."""
    return image.getpixel((0, 0))


def test_pretrain_absolute_paths_and_caption_lists(tmp_path):
    red = _image(tmp_path / "red.png", (255, 0, 0))
    blue = _image(tmp_path / "sub" / "blue.jpg", (0, 0, 255), "JPEG")
    ann = _json(tmp_path / "p.json", [
        {"image": str(red), "caption": "A Red, red SQUARE!"},
        {"image": "sub/blue.jpg", "caption": ["first one.", "second-one", "third/one"]},
    ])
    dataset = pretrain_dataset([ann], _pixel, image_root=str(tmp_path))
    assert len(dataset) == 2
    assert dataset[0] == ((255, 0, 0), "a red red square")
    random.seed(0)
    seen = {dataset[1][1] for _ in range(60)}
    assert seen == {"first one", "second one", "third one"}
    assert dataset[1][0][2] > 200


def test_pretrain_without_root_needs_absolute_paths(tmp_path):
    red = _image(tmp_path / "red.png", (255, 0, 0))
    ann = _json(tmp_path / "p.json", [{"image": str(red), "caption": "x"}])
    assert pretrain_dataset(ann, _pixel)[0] == ((255, 0, 0), "x")


def test_retrieval_train_idx_is_contiguous_by_first_appearance(tmp_path):
    for name in "abc":
        _image(tmp_path / f"{name}.png")
    items = [("b.png", 907), ("a.png", 12), ("b.png", 907), ("c.png", "z"), ("a.png", 12)]
    ann = _json(tmp_path / "r.json", [{"image": i, "caption": f"Cap {n}.", "image_id": k} for n, (i, k) in
                                      enumerate(items)])
    dataset = re_train_dataset(ann, _pixel, str(tmp_path))
    assert [dataset[i][2] for i in range(5)] == [0, 1, 0, 2, 1]
    assert dataset[3][1] == "cap 3"


def test_retrieval_eval_builds_text_maps(tmp_path):
    _image(tmp_path / "x.png", (1, 2, 3))
    _image(tmp_path / "y.png", (4, 5, 6))
    ann = _json(tmp_path / "e.json", [
        {"image": "x.png", "caption": ["One.", "Two!"]},
        {"image": "y.png", "caption": ["Three", "Four", "Five"]},
    ])
    dataset = re_eval_dataset(ann, _pixel, str(tmp_path))
    assert dataset.text == ["one", "two", "three", "four", "five"]
    assert dataset.image == ["x.png", "y.png"]
    assert dataset.img2txt == {0: [0, 1], 1: [2, 3, 4]}
    assert dataset.txt2img == {0: 0, 1: 0, 2: 1, 3: 1, 4: 1}
    assert dataset[1] == ((4, 5, 6), 1)


def test_retrieval_eval_rejects_string_captions(tmp_path):
    ann = _json(tmp_path / "e.json", [{"image": "x.png", "caption": "single"}])
    with pytest.raises(ValueError, match="list of captions"):
        re_eval_dataset(ann, _pixel, str(tmp_path))


def _vqa_files(tmp_path):
    _image(tmp_path / "coco" / "q.png", (9, 9, 9))
    _image(tmp_path / "vg" / "v.png", (99, 99, 99))
    train = _json(tmp_path / "vqa_train.json", [
        {"dataset": "vqa", "image": "q.png", "question": "What's this?",
         "answer": ["yes"] * 6 + ["no"] * 3 + ["maybe so"]},
        {"dataset": "vg", "image": "v.png", "question": "How many dogs?", "answer": "two"},
    ])
    long_question = " ".join(f"w{i}" for i in range(60))
    test = _json(tmp_path / "vqa_test.json", [
        {"dataset": "vqa", "image": "q.png", "question": long_question, "question_id": 42},
    ])
    answers = _json(tmp_path / "answer_list.json", ["yes", "no", "two"])
    return train, test, answers, str(tmp_path / "coco"), str(tmp_path / "vg")


def test_vqa_train_answers_and_weights(tmp_path):
    train, _, _, vqa_root, vg_root = _vqa_files(tmp_path)
    dataset = vqa_dataset(train, _pixel, vqa_root, vg_root, split="train")
    image, question, answers, weights = dataset[0]
    assert image == (9, 9, 9) and question == "whats this"
    assert answers == ["yes[SEP]", "no[SEP]", "maybe so[SEP]"]
    assert weights == pytest.approx([0.6, 0.3, 0.1])
    image, question, answers, weights = dataset[1]
    assert image == (99, 99, 99)
    assert (question, answers, weights) == ("how many dogs", ["two[SEP]"], [0.5])


def test_vqa_train_question_limit_and_eos(tmp_path):
    train, _, _, vqa_root, vg_root = _vqa_files(tmp_path)
    dataset = vqa_dataset(train, _pixel, vqa_root, vg_root, eos="</s>", max_ques_words=2)
    assert dataset[1][1:3] == ("how many", ["two</s>"])


def test_vqa_test_items_and_answer_list(tmp_path):
    _, test, answers, vqa_root, vg_root = _vqa_files(tmp_path)
    dataset = vqa_dataset(test, _pixel, vqa_root, vg_root, split="test", max_ques_words=30, answer_list=answers)
    image, question, question_id = dataset[0]
    assert question_id == 42 and len(question.split(" ")) == 50
    assert dataset.answer_list == ["yes", "no", "two"]
    with pytest.raises(ValueError, match="answer_list"):
        vqa_dataset(test, _pixel, vqa_root, vg_root, split="test")
    with pytest.raises(ValueError, match="split"):
        vqa_dataset(test, _pixel, vqa_root, vg_root, split="val")


def test_nlvr_pairs_and_labels(tmp_path):
    _image(tmp_path / "l.png", (1, 1, 1))
    _image(tmp_path / "r.png", (2, 2, 2))
    ann = _json(tmp_path / "n.json", [
        {"images": ["l.png", "r.png"], "sentence": "Two dogs.", "label": "True"},
        {"images": ["r.png", "l.png"], "sentence": "No dogs", "label": "False"},
    ])
    dataset = nlvr_dataset(ann, _pixel, str(tmp_path))
    assert dataset[0] == ((1, 1, 1), (2, 2, 2), "two dogs", 1)
    assert dataset[1] == ((2, 2, 2), (1, 1, 1), "no dogs", 0)


def test_ve_path_rule_and_labels(tmp_path):
    _image(tmp_path / "1234.jpg", (5, 5, 5), "JPEG")
    labels = ["entailment", "neutral", "contradiction"]
    ann = _json(tmp_path / "v.json", [{"image": "1234", "sentence": f"S {l}.", "label": l} for l in labels])
    dataset = ve_dataset(ann, _pixel, str(tmp_path))
    assert [dataset[i][2] for i in range(3)] == [2, 1, 0]
    assert dataset[0][1] == "s entailment"
    bad = _json(tmp_path / "bad.json", [{"image": "1234", "sentence": "s", "label": "maybe"}])
    with pytest.raises(ValueError, match="maybe"):
        ve_dataset(bad, _pixel, str(tmp_path))


def test_grounding_train_idx_by_basename_and_test_ref_ids(tmp_path):
    for name in ("a/img1.jpg", "b/img1.jpg", "img2.jpg"):
        _image(tmp_path / name, fmt="JPEG")
    ann = _json(tmp_path / "g.json", [
        {"image": "img2.jpg", "text": "Left man."},
        {"image": "a/img1.jpg", "text": "dog"},
        {"image": "b/img1.jpg", "text": "cat"},
        {"image": "img2.jpg", "text": "right man"},
    ])
    train = grounding_dataset(ann, _pixel, str(tmp_path), mode="train")
    assert [train[i][2] for i in range(4)] == [0, 1, 1, 0]
    assert train[0][1] == "left man"
    val = _json(tmp_path / "val.json", [{"image": "img2.jpg", "text": "x", "ref_id": 7}])
    test = _json(tmp_path / "test.json", [{"image": "img2.jpg", "text": "y", "ref_id": 8}])
    dataset = grounding_dataset([val, test], _pixel, str(tmp_path), mode="test")
    assert [dataset[i][1:] for i in range(2)] == [("x", 7), ("y", 8)]


def _retrieval_config(tmp_path):
    _image(tmp_path / "x.png")
    train = _json(tmp_path / "t.json", [{"image": "x.png", "caption": "c", "image_id": 1}])
    evaluation = _json(tmp_path / "e.json", [{"image": "x.png", "caption": ["c", "d"]}])
    return {"train_file": [train], "val_file": evaluation, "test_file": evaluation, "image_root": str(tmp_path),
            "image_res": 16}


def test_create_dataset_retrieval_splits_and_transforms(tmp_path):
    splits = create_dataset("re", _retrieval_config(tmp_path))
    assert isinstance(splits, DatasetSplits)
    train, val, test = splits
    assert isinstance(train, re_train_dataset) and isinstance(val, re_eval_dataset)
    assert train[0][0].shape == (3, 16, 16) and val[0][0].shape == (3, 16, 16)
    assert test.text == ["c", "d"]


def test_create_dataset_vqa_and_pretrain(tmp_path):
    train, test, answers, vqa_root, vg_root = _vqa_files(tmp_path)
    config = {"train_file": [train], "test_file": [test], "answer_list": answers, "vqa_root": vqa_root,
              "vg_root": vg_root, "image_res": 16}
    vqa_train, vqa_val, vqa_test = create_dataset("vqa", config)
    assert vqa_val is None and vqa_train.split == "train" and vqa_test.answer_list == ["yes", "no", "two"]
    image = _image(tmp_path / "p.png")
    ann = _json(tmp_path / "p.json", [{"image": str(image), "caption": "c"}])
    pretrain = create_dataset("pretrain", {"train_file": [ann], "image_res": 16, "skip_bad_images": True})
    assert pretrain.val is None and pretrain.test is None and pretrain.train.skip_bad_images


def test_create_dataset_names_missing_keys_and_unknown_tasks(tmp_path):
    config = _retrieval_config(tmp_path)
    del config["val_file"]
    with pytest.raises(KeyError, match="val_file"):
        create_dataset("re", config)
    with pytest.raises(ValueError, match="unknown task"):
        create_dataset("captioning", {"image_res": 16})


def test_simla_pretraining_gets_its_views_and_masks_only_when_mim_is_on(tmp_path):
    """SIMLA pretraining with MIM on: every item's image column is (ViT view, tokenizer view, patch mask), and the collated batch
    stacks each; ALBEF, and SIMLA with mim.enabled false, keep the plain pretraining image."""
    from dataset import build_collate_fn
    from models.tokenization import build_tokenizer
    image = _image(tmp_path / "p.png")
    ann = _json(tmp_path / "p.json", [{"image": str(image), "caption": "a red square"}] * 2)
    base = {"train_file": [ann], "image_res": 32, "vit": {"patch_size": 8}}
    mim = {"tokenizer": "color_quant", "color_levels": 2, "tokenizer_res": 16, "num_masking_patches": 5,
           "min_num_patches": 2}
    simla = {**base, "model": "simla", "vit_mask_token": True, "mim": mim}
    views, caption = create_dataset("pretrain", simla).train[0]
    picture, tok_view, mask = views
    assert caption == "a red square" and picture.shape == (3, 32, 32) and tok_view.shape == (3, 16, 16)
    assert mask.dtype == torch.bool and mask.shape == (16,) and 2 <= int(mask.sum()) <= 5
    assert 0.1 - 1e-6 <= float(tok_view.min()) and float(tok_view.max()) <= 0.9 + 1e-6  # DALL-E's map_pixels
    dataset = create_dataset("pretrain", simla).train
    collated = build_collate_fn("pretrain", build_tokenizer("none"))([dataset[0], dataset[1]])
    assert [tuple(t.shape) for t in collated[0]] == [(2, 3, 32, 32), (2, 3, 16, 16), (2, 16)]
    # ALBEF; SIMLA with MIM off; SIMLA's text-assignment pretraining (no mask token, no MIM)
    for config in (base, {**simla, "mim": {**mim, "enabled": False}}, {**simla, "vit_mask_token": False}):
        plain, _ = create_dataset("pretrain", config).train[0]
        assert torch.is_tensor(plain) and plain.shape == (3, 32, 32)
