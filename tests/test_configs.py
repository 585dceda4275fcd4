import glob
import json
import os

import pytest
import torch

import engine.config as engine_config
import utils
from scheduler import lr_at

torch.set_num_threads(1)

CONFIG_DIR = os.path.join(utils.REPO_ROOT, "configs")
OFFICIAL = ["Pretrain", "Pretrain_4M", "Retrieval_coco", "Retrieval_flickr", "VQA", "NLVR", "NLVR_pretrain", "VE",
            "Grounding"]


def _load(name):
    return engine_config.load_config(os.path.join(CONFIG_DIR, f"{name}.yaml"))


def test_every_yaml_config_loads_and_validates():
    paths = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))
    assert {os.path.basename(p)[:-5] for p in paths} >= set(OFFICIAL)
    for path in paths:
        config = engine_config.load_config(path)
        assert isinstance(config["bert_config"], dict) or os.path.isfile(config["bert_config"]), path


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_blocks(name):
    config = _load(name)
    assert config["optimizer"]["opt"] == "adamW" and config["optimizer"]["weight_decay"] == 0.02
    sched = config["schedular"]
    assert (sched["sched"], sched["decay_rate"], sched["cooldown_epochs"], sched["warmup_lr"]) == ("cosine", 1, 0,
                                                                                                  1e-5)
    assert sched["lr"] == config["optimizer"]["lr"]


# (optimizer lr, epochs, min_lr, warmup_epochs, image_res): the official task configs
TABLE = {
    "Pretrain": (1e-4, 30, 1e-5, 20, 256), "Pretrain_4M": (1e-4, 30, 1e-5, 20, 256),
    "Retrieval_coco": (1e-5, 5, 1e-6, 1, 384), "Retrieval_flickr": (1e-5, 10, 1e-6, 1, 384),
    "VQA": (2e-5, 8, 1e-6, 4, 384), "NLVR": (2e-5, 10, 1e-6, 1, 384), "NLVR_pretrain": (2e-5, 1, 1e-5, 1, 256),
    "VE": (2e-5, 5, 1e-6, 1, 384), "Grounding": (1e-5, 5, 1e-6, 1, 384),
}


@pytest.mark.parametrize("name", OFFICIAL)
def test_schedule_values_match_spec_table(name):
    config = _load(name)
    sched = config["schedular"]
    got = (config["optimizer"]["lr"], sched["epochs"], sched["min_lr"], sched["warmup_epochs"], config["image_res"])
    assert got == TABLE[name]


def test_task_specific_values():
    assert _load("Retrieval_coco")["k_test"] == 256 and _load("Retrieval_flickr")["k_test"] == 128
    vqa = _load("VQA")
    assert (vqa["eos"], vqa["k_test"], vqa["batch_size_train"], vqa["batch_size_test"]) == ("[SEP]", 128, 32, 16)
    assert _load("VE")["warm_up"] is False
    assert _load("NLVR")["batch_size"] == 16
    pretrain = _load("Pretrain")
    assert (pretrain["batch_size"], pretrain["queue_size"], pretrain["momentum"], pretrain["temp"]) == (
        64, 65536, 0.995, 0.07)
    assert pretrain["mlm_probability"] == 0.15
    grounding = _load("Grounding")
    assert grounding["det_file"] == "data/refcoco+/dets.json" and grounding["batch_size"] == 32


def test_pretrain_4m_is_pretrain_without_cc12m():
    full, small = _load("Pretrain"), _load("Pretrain_4M")
    assert [f for f in full["train_file"] if "cc12m" not in f] == small["train_file"]
    assert {k: v for k, v in full.items() if k != "train_file"} == {k: v for k, v in small.items() if k != "train_file"}
    assert small["train_file"] == _load("NLVR_pretrain")["train_file"]


def test_config_bert_matches_spec():
    with open(os.path.join(CONFIG_DIR, "config_bert.json")) as f:
        bert = json.load(f)
    assert bert == {
        "architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
        "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30522, "fusion_layer": 6,
        "encoder_width": 768,
    }


def test_pretrain_config_drives_the_documented_schedule():
    config = _load("Pretrain")
    assert lr_at(config, 0, 2001) == pytest.approx(1e-4)
    assert float(f"{lr_at(config, 1):.3g}") == 9.98e-5
