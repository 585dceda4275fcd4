"""Image and annotation reading: clear errors, truncated-image tolerance, skip-and-count mode."""

import io
import json
import pickle
import warnings

import pytest
import torch
from PIL import Image

from dataset.caption_dataset import re_train_dataset
from dataset.image_io import ImageLoadError, load_image, read_annotations

torch.set_num_threads(1)


def _write_jpeg(path, size=(16, 12), color=(200, 30, 40)):
    Image.new("RGB", size, color).save(path, format="JPEG")


def test_load_image_returns_rgb(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (5, 4), 77).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (5, 4)
    assert image.getpixel((0, 0)) == (77, 77, 77)


def test_decompression_bomb_limit_is_disabled():
    assert Image.MAX_IMAGE_PIXELS is None


def test_missing_image_error_names_path_index_and_fix(tmp_path):
    path = tmp_path / "absent.jpg"
    with pytest.raises(ImageLoadError) as info:
        load_image(path, index=3)
    message = str(info.value)
    assert str(path) in message and "dataset index 3" in message
    assert "image_root" in message and "skip_bad_images" in message
    assert info.value.path == str(path) and info.value.index == 3
    assert isinstance(info.value, RuntimeError)


def test_corrupt_image_error(tmp_path):
    path = tmp_path / "garbage.jpg"
    path.write_bytes(b"\xff\xd8\xff\x00 this is not a jpeg")
    with pytest.raises(ImageLoadError, match="garbage.jpg.*dataset index 7"):
        load_image(path, index=7)


def test_truncated_jpeg_is_tolerated(tmp_path):
    buffer = io.BytesIO()
    noise = Image.effect_noise((64, 64), 50).convert("RGB")
    noise.save(buffer, format="JPEG", quality=95)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    assert load_image(path).size == (64, 64)


def test_error_survives_a_worker_round_trip():
    # DataLoader workers rebuild the exception from its message alone.
    rebuilt = ImageLoadError(str(ImageLoadError("cannot read image 'x'", path="x", index=1)))
    assert "cannot read image 'x'" in str(pickle.loads(pickle.dumps(rebuilt)))


def _retrieval_files(tmp_path, names):
    annotations = [{"image": name, "caption": f"caption {i}", "image_id": name} for i, name in enumerate(names)]
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(annotations))
    return ann_file


def test_bad_image_raises_without_skip_mode(tmp_path):
    _write_jpeg(tmp_path / "a.jpg")
    ann_file = _retrieval_files(tmp_path, ["a.jpg", "missing.jpg"])
    dataset = re_train_dataset(str(ann_file), lambda image: image, str(tmp_path))
    with pytest.raises(ImageLoadError, match="missing.jpg.*dataset index 1"):
        dataset[1]


def test_skip_mode_returns_next_readable_item_and_counts(tmp_path):
    _write_jpeg(tmp_path / "a.jpg")
    _write_jpeg(tmp_path / "c.jpg", color=(0, 0, 255))
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    ann_file = _retrieval_files(tmp_path, ["a.jpg", "bad.jpg", "c.jpg"])
    dataset = re_train_dataset(str(ann_file), lambda image: image, str(tmp_path), skip_bad_images=True)
    with pytest.warns(UserWarning, match="bad.jpg"):
        image, caption, idx = dataset[1]
    assert (caption, idx) == ("caption 2", 2)
    assert image.getpixel((0, 0))[2] > 200
    assert dataset.num_skipped == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dataset[0][1] == "caption 0"
    assert dataset.num_skipped == 1


def test_skip_mode_wraps_around_and_fails_when_nothing_is_readable(tmp_path):
    _write_jpeg(tmp_path / "a.jpg")
    ann_file = _retrieval_files(tmp_path, ["a.jpg", "gone.jpg"])
    dataset = re_train_dataset(str(ann_file), lambda image: image, str(tmp_path), skip_bad_images=True)
    with pytest.warns(UserWarning):
        assert dataset[1][1] == "caption 0"
    ann_file = _retrieval_files(tmp_path, ["gone1.jpg", "gone2.jpg"])
    dataset = re_train_dataset(str(ann_file), lambda image: image, str(tmp_path), skip_bad_images=True)
    with pytest.warns(UserWarning), pytest.raises(ImageLoadError, match="no readable image"):
        dataset[0]
    assert dataset.num_skipped == 2


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        read_annotations(str(tmp_path / "nowhere.json"))


def test_annotation_file_must_hold_a_list(tmp_path):
    path = tmp_path / "dict.json"
    path.write_text(json.dumps({"image": "a.jpg"}))
    with pytest.raises(ValueError, match="dict.json.*JSON list"):
        read_annotations(str(path))


def test_annotation_items_must_have_required_keys(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps([{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg"}]))
    with pytest.raises(ValueError, match=r"item 1 lacks keys \['caption'\]"):
        read_annotations(str(path), required_keys=("image", "caption"))


def test_annotation_lists_concatenate_in_order(tmp_path):
    first, second = tmp_path / "1.json", tmp_path / "2.json"
    first.write_text(json.dumps([{"k": 1}, {"k": 2}]))
    second.write_text(json.dumps([{"k": 3}]))
    assert [item["k"] for item in read_annotations([str(first), str(second)])] == [1, 2, 3]
