import argparse
import json
import os
import random

import numpy as np
import pytest
import torch

import engine.config as engine_config
import utils
from engine.config import ConfigError, load_config
from utils import MetricTracker

torch.set_num_threads(1)

BERT_JSON = os.path.join(utils.REPO_ROOT, "configs", "config_bert.json")


def _write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


MINIMAL = f"""
bert_config: '{BERT_JSON}'
image_res: 256
optimizer: {{opt: adamW, lr: 1e-4, weight_decay: 0.02}}
schedular: {{sched: cosine, lr: 1e-4, epochs: 30, min_lr: 1e-5, decay_rate: 1, warmup_lr: 1e-5, warmup_epochs: 20,
             cooldown_epochs: 0}}
"""


# --- config -----------------------------------------------------------------------------------------------------

def test_yaml12_reads_exponents_as_floats(tmp_path):
    config = load_config(_write(tmp_path, MINIMAL))
    assert config["optimizer"]["lr"] == 1e-4 and isinstance(config["optimizer"]["lr"], float)
    assert isinstance(config["schedular"]["min_lr"], float)
    assert config["image_res"] == 256 and isinstance(config["image_res"], int)


def test_quirk_defaults_are_filled_and_recorded(tmp_path):
    config = load_config(_write(tmp_path, MINIMAL))
    assert config["mlm_distill_softmax_dim"] == "vocab"
    assert config["warmup_step_size"] == 100
    assert config["wd_exempt_extra"] == []
    assert config["precision"] == "fp32"
    assert set(engine_config.QUIRK_FLAGS) <= set(config)


def test_dotted_overrides_are_typed(tmp_path):
    overrides = ["optimizer.lr=2e-4", "image_res=384", "distill=true", "train_file=[a.json, b.json]",
                 "image_root=/data/coco:images", "wd_exempt_extra=[pos_embed, temp]", "vit.depth=2"]
    config = load_config(_write(tmp_path, MINIMAL), overrides)
    assert config["optimizer"]["lr"] == 2e-4 and isinstance(config["optimizer"]["lr"], float)
    assert config["optimizer"]["weight_decay"] == 0.02  # sibling keys survive
    assert config["image_res"] == 384
    assert config["distill"] is True
    assert config["train_file"] == ["a.json", "b.json"]
    assert config["image_root"] == "/data/coco:images"
    assert config["wd_exempt_extra"] == ["pos_embed", "temp"]
    assert config["vit"] == {"depth": 2}


def test_override_without_equals_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(_write(tmp_path, MINIMAL), ["optimizer.lr"])


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path = _write(tmp_path, MINIMAL + "bacth_size: 64\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert path in message and "'bacth_size'" in message and "batch_size" in message


def test_unknown_nested_key_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"optimizer\.lr"):
        load_config(_write(tmp_path, MINIMAL), ["optimizer.lrr=1e-4"])


def test_quoted_number_is_a_type_error(tmp_path):
    with pytest.raises(ConfigError, match="unquoted"):
        load_config(_write(tmp_path, MINIMAL), ["optimizer.lr='1e-4'"])


def test_bool_is_not_an_integer(tmp_path):
    with pytest.raises(ConfigError, match="image_res"):
        load_config(_write(tmp_path, MINIMAL), ["image_res=true"])


def test_choices_are_enforced(tmp_path):
    with pytest.raises(ConfigError, match="rerank_score"):
        load_config(_write(tmp_path, MINIMAL), ["rerank_score=itc"])


def test_missing_bert_config_file_is_a_clear_error(tmp_path):
    path = _write(tmp_path, MINIMAL.replace(BERT_JSON, "configs/no_such_bert.json"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "configs/no_such_bert.json" in str(err.value) and path in str(err.value)


def test_relative_bert_config_resolves_against_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(_write(tmp_path, MINIMAL.replace(BERT_JSON, "configs/config_bert.json")))
    assert config["bert_config"] == BERT_JSON
    assert engine_config.load_bert_config(config["bert_config"])["fusion_layer"] == 6


def test_inline_bert_config_is_kept(tmp_path):
    text = MINIMAL.replace(f"'{BERT_JSON}'", "{hidden_size: 64, num_hidden_layers: 2}")
    config = load_config(_write(tmp_path, text))
    assert engine_config.load_bert_config(config["bert_config"]) == {"hidden_size": 64, "num_hidden_layers": 2}


def test_missing_config_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_save_config_round_trip(tmp_path):
    config = load_config(_write(tmp_path, MINIMAL), ["vqa_decoder_distill=off"])
    out = str(tmp_path / "out" / "config.yaml")
    engine_config.save_config(config, out)
    assert load_config(out) == config


# --- files ------------------------------------------------------------------------------------------------------

def test_atomic_torch_save_leaves_no_temp_file(tmp_path):
    path = str(tmp_path / "ckpt.pth")
    utils.atomic_torch_save({"w": torch.arange(3)}, path)
    assert os.listdir(tmp_path) == ["ckpt.pth"]
    assert torch.equal(torch.load(path)["w"], torch.arange(3))


class _FailsMidway:
    def __reduce__(self):
        raise RuntimeError("writer crashed")


def test_atomic_torch_save_keeps_original_when_writer_fails(tmp_path):
    path = str(tmp_path / "ckpt.pth")
    utils.atomic_torch_save({"epoch": 1}, path)
    with pytest.raises(RuntimeError, match="writer crashed"):
        utils.atomic_torch_save({"epoch": 2, "bad": _FailsMidway()}, path)
    assert torch.load(path) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["ckpt.pth"]


def test_atomic_write_json_and_append_jsonl(tmp_path):
    utils.atomic_write_json({"acc": torch.tensor(0.5), "ids": np.arange(2)}, str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text()) == {"acc": 0.5, "ids": [0, 1]}
    log = str(tmp_path / "sub" / "log.jsonl")
    utils.append_jsonl(log, {"step": 1, "loss": torch.tensor(2.0)})
    utils.append_jsonl(log, {"step": 2})
    lines = [json.loads(line) for line in open(log)]
    assert lines == [{"step": 1, "loss": 2.0}, {"step": 2}]


# --- distributed (single process) -------------------------------------------------------------------------------

def test_single_process_helpers_without_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    args = argparse.Namespace(device="cpu", dist_url="env://")
    utils.init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size, args.gpu) == (False, 0, 1, 0)
    assert not utils.is_dist_avail_and_initialized()
    assert utils.get_world_size() == 1 and utils.get_rank() == 0 and utils.is_main_process()
    utils.barrier()
    t = torch.tensor([1.0, 2.0])
    assert utils.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]


def test_launch_env_reads_torchrun_then_slurm(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert utils._launch_env() == (5, 8, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert utils._launch_env() == (3, 4, 3)


def test_setup_for_distributed_silences_non_master(capsys):
    try:
        utils.setup_for_distributed(False)
        print("hidden")
        print("forced", force=True)
    finally:
        utils.setup_for_distributed(True)
    print("shown")
    assert capsys.readouterr().out == "forced\nshown\n"


def test_gloo_group_of_one_allreduces_and_merges_metrics(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        assert utils.is_dist_avail_and_initialized() and utils.get_world_size() == 1
        utils.barrier()
        tracker = MetricTracker()
        tracker.update(loss=2.0, n=2)
        tracker.synchronize()
        assert tracker.summary() == {"loss": 2.0}
    finally:
        dist.destroy_process_group()


# --- seeding and metrics ----------------------------------------------------------------------------------------

def test_seed_everything_makes_all_generators_repeat():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()
    utils.seed_everything(7)
    first = draw()
    utils.seed_everything(7)
    assert draw() == first
    utils.seed_everything(8)
    assert draw() != first


def test_rng_state_round_trip():
    utils.seed_everything(1)
    state = utils.get_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    utils.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_metric_tracker_weighted_means():
    tracker = MetricTracker()
    tracker.update(loss=torch.tensor(1.0), acc=0.5, n=1)
    tracker.update(loss=4.0, n=3)
    assert tracker.summary() == {"loss": pytest.approx(13 / 4), "acc": 0.5}
    assert "loss: 3.25" in str(tracker)
    tracker.reset()
    assert tracker.summary() == {}
