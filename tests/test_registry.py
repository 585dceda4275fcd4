"""models/registry.py: the `model` config key, the task table of the ALBEF family, and the start-from-a-file rules."""
import dataclasses

import pytest
import torch

import models.model_nlvr
import models.model_pretrain
import models.model_pretrain_nlvr
import models.model_retrieval
import models.model_ve
import models.model_vqa
from models import registry
from models.albef import AlbefBase
from tests.parity_utils import StubTokenizer, load_reference, model_config

ALBEF_CLASSES = {'pretrain': models.model_pretrain.ALBEF, 'retrieval': models.model_retrieval.ALBEF,
                 'grounding': models.model_retrieval.ALBEF, 'vqa': models.model_vqa.ALBEF,
                 'nlvr': models.model_nlvr.ALBEF, 've': models.model_ve.ALBEF,
                 'pretrain_nlvr': models.model_pretrain_nlvr.ALBEF}


@pytest.fixture
def scratch_family():
    """A throw-away family with only a pretraining task, removed afterwards."""
    spec = registry.TaskSpec(models.model_pretrain.ALBEF, lambda model, path, config: None)
    registry.register_family('scratch', {'pretrain': spec})
    yield 'scratch'
    registry._FAMILIES.pop('scratch')


def test_family_defaults_to_albef_and_importing_the_registry_registers_it():
    assert 'albef' in registry.families()
    assert registry.model_family({}) == 'albef'
    assert registry.model_family({'model': None}) == 'albef'
    assert registry.model_family({'model': 'albef'}) == 'albef'


def test_unknown_family_names_the_key_and_the_registered_families():
    with pytest.raises(ValueError, match=r"'model'.*'blip'.*albef"):
        registry.model_family({'model': 'blip'})
    with pytest.raises(ValueError, match='blip'):
        registry.task_spec({'model': 'blip'}, 'pretrain')


def test_albef_has_every_task_and_its_classes_are_the_model_files_own():
    assert set(registry.TASKS) == set(ALBEF_CLASSES)
    for task, cls in ALBEF_CLASSES.items():
        spec = registry.task_spec({}, task)
        assert spec.model_class is cls, task
        assert issubclass(spec.model_class, AlbefBase) and spec.model_class.__name__ == 'ALBEF'
        assert spec.optimizer_groups is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        registry.task_spec({}, 'vqa').model_class = None


def test_unknown_task_and_a_task_the_family_lacks_are_clear_errors(scratch_family):
    with pytest.raises(ValueError, match="unknown task 'captioning'"):
        registry.task_spec({}, 'captioning')
    with pytest.raises(ValueError, match=r"model: scratch has no 've' task; its tasks are pretrain.*albef"):
        registry.task_spec({'model': scratch_family}, 've')
    assert registry.task_spec({'model': scratch_family}, 'pretrain').model_class is models.model_pretrain.ALBEF
    with pytest.raises(ValueError, match='unknown tasks'):
        registry.register_family('bad', {'captioning': None})


def test_build_is_the_class_called_with_the_config():
    ref = load_reference('ve')
    config = model_config(ref['config'])
    model = registry.task_spec(config, 've').build(config, text_encoder=None, tokenizer=StubTokenizer())
    assert type(model) is models.model_ve.ALBEF
    assert list(model.state_dict()) == list(ref['state_dict'])


def test_load_checkpoint_round_trips_a_tiny_pretraining_model(tmp_path, capsys):
    ref = load_reference('pretrain')
    config = model_config(ref['config'])
    spec = registry.task_spec(config, 'pretrain')
    source = spec.build(config, text_encoder=None, tokenizer=StubTokenizer(), init_deit=False)
    source.load_state_dict(ref['state_dict'])
    path = tmp_path / 'checkpoint.pth'
    torch.save({'model': source.state_dict(), 'epoch': 0}, path)

    torch.manual_seed(1)
    target = spec.build(config, text_encoder=None, tokenizer=StubTokenizer(), init_deit=False)
    assert not torch.equal(target.vision_proj.weight, source.vision_proj.weight)
    spec.load_checkpoint(target, str(path), config)
    loaded = target.state_dict()
    assert list(loaded) == list(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_load_checkpoint_passes_the_config_switches(tmp_path, capsys):
    ref = load_reference('pretrain')
    path = tmp_path / 'pretrain.pth'
    torch.save(ref['state_dict'], path)
    config = model_config(load_reference('retrieval')['config'])
    config.update(reset_queues_on_finetune=True)
    spec = registry.task_spec(config, 'grounding')
    model = spec.build(config, text_encoder=None, tokenizer=StubTokenizer())
    missing, _, dropped = spec.load_checkpoint(model, str(path), config)
    assert 'image_queue' in dropped and int(model.queue_ptr) == 0 and bool((model.idx_queue == -100).all())
    assert 'reset_queues_on_finetune' in capsys.readouterr().out
