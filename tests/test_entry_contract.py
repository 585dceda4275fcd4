"""The contract every entry script follows (engine/script.py), checked through Retrieval.py on a six-picture world:
metrics.json describes the run that wrote it, fine-tuning keeps the official checkpoints plus checkpoint_last.pth,
the training sampler is seeded from --seed, a mid-epoch resume ends bit for bit where the uninterrupted run does,
untrusted pickles are refused, and the synthetic configs need no extra flags."""
import argparse
import json
import os
import pickle
import warnings

import pytest
import torch
from PIL import Image

import engine
from engine.config import load_config, save_config
from models.checkpoint import CheckpointError, load_checkpoint_file, to_state_dict_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {'red': (220, 30, 30), 'green': (30, 200, 30), 'blue': (30, 30, 220), 'white': (240, 240, 240),
           'black': (15, 15, 15), 'yellow': (230, 220, 30)}


@pytest.fixture
def world(tmp_path):
    """Six coloured squares with two captions each (official retrieval formats) and a toy-size retrieval config."""
    train, val = [], []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        Image.new('RGB', (40, 40), rgb).save(tmp_path / f'{name}.jpg')
        captions = [f'a {name} square', f'the picture is {name}']
        train += [{'image': f'{name}.jpg', 'caption': c, 'image_id': i} for c in captions]
        val.append({'image': f'{name}.jpg', 'caption': captions})
    (tmp_path / 'train.json').write_text(json.dumps(train))
    (tmp_path / 'val.json').write_text(json.dumps(val))
    config = load_config(os.path.join(REPO, 'configs', 'Retrieval_synthetic.yaml'))
    config.update(train_file=[str(tmp_path / 'train.json')], val_file=str(tmp_path / 'val.json'),
                  test_file=str(tmp_path / 'val.json'), image_root=str(tmp_path), image_res=32, batch_size_train=2,
                  batch_size_test=4, num_workers=0, queue_size=8, k_test=3, max_steps_per_epoch=4)
    config['vit'] = dict(config['vit'], depth=1)
    config['bert_config'] = dict(config['bert_config'], num_hidden_layers=2, fusion_layer=1)
    config['schedular'] = dict(config['schedular'], epochs=2)
    return tmp_path, config


def run_retrieval(root, config, *argv):
    """Retrieval.py in this process with `config` written to a file; returns the parsed arguments."""
    import Retrieval
    path = root / f'config_{len(list(root.glob("config_*.yaml")))}.yaml'
    save_config(config, str(path))
    args = Retrieval.parser().parse_args(['--config', str(path), '--device', 'cpu', '--seed', '3', *argv])
    Retrieval.main(args)
    return args


def read_metrics(out):
    return json.loads((out / 'metrics.json').read_text())


def final_weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['model']


def test_metrics_json_describes_the_run_that_wrote_it(world):
    root, config = world
    out = root / 'run'
    run_retrieval(root, config, '--output_dir', str(out), '--evaluate')
    evaluated = read_metrics(out)
    assert evaluated['evaluate_only'] and evaluated['epoch'] == 0 and evaluated['task'] == 'retrieval'
    assert evaluated['model'] == 'albef' and 'val_r_mean' in evaluated['metrics']

    run_retrieval(root, config, '--output_dir', str(out))  # fine-tuning in the same folder
    tuned = read_metrics(out)
    best = torch.load(out / 'checkpoint_best.pth', map_location='cpu', weights_only=True)
    assert not tuned['evaluate_only'] and tuned['selected_by'] == 'val_r_mean'
    assert tuned['epoch'] == best['best_epoch'] == best['epoch']
    assert tuned['metrics']['val_r_mean'] == best['best_record']['val_r_mean'] == tuned['val']['r_mean']
    # log.txt still holds both runs (the official append-only log); metrics.json only this one
    logged = [json.loads(x) for x in (out / 'log.txt').read_text().splitlines() if x.startswith('{')]
    assert len(logged) == 3


def test_fine_tuning_keeps_the_best_and_the_last_checkpoint_unless_asked_and_tensorboard_on_request(world):
    root, config = world
    out = root / 'default'
    run_retrieval(root, config, '--output_dir', str(out))
    assert sorted(p.name for p in out.glob('checkpoint*')) == ['checkpoint_best.pth', 'checkpoint_last.pth']
    assert engine.find_latest_checkpoint(str(out)) == str(out / 'checkpoint_last.pth')
    every = root / 'every'  # also writes TensorBoard scalars of every step and epoch
    run_retrieval(root, config, '--output_dir', str(every), '--opt', 'keep_epoch_checkpoints=true',
                  '--opt', 'tensorboard=true', '--opt', 'log_every=1')
    assert sorted(p.name for p in every.glob('checkpoint*')) == ['checkpoint_00.pth', 'checkpoint_01.pth',
                                                                 'checkpoint_best.pth', 'checkpoint_last.pth']
    from reproduce.events import read_scalars
    scalars = read_scalars(str(every / 'tensorboard'))
    steps = [json.loads(x) for x in (every / 'train_steps.jsonl').read_text().splitlines()]
    assert len(scalars['train/loss_ita']) == len(steps) == 8  # 2 epochs x 4 steps, one point per logged step
    assert [v for _, v in scalars['train/loss_ita']] == [pytest.approx(s['loss_ita'], abs=1e-5) for s in steps]
    assert [step for step, _ in scalars['epoch/val_r_mean']] == [0, 1]
    assert not (out / 'tensorboard').exists()  # off by default


def test_training_loader_order_is_a_function_of_the_seed():
    data = list(range(40))

    def first_batches(seed, epoch):
        args = argparse.Namespace(seed=seed)
        loader, sampler = engine.train_loader(data, {'num_workers': 0}, args, None, batch_size=4)
        sampler.set_epoch(epoch)
        return [b.tolist() for b in loader][:3]

    assert first_batches(1, 0) == first_batches(1, 0)
    assert first_batches(1, 0) != first_batches(2, 0)
    assert first_batches(1, 0) != first_batches(1, 1)


def test_fine_tuning_resumes_mid_epoch_bit_for_bit(world):
    root, config = world
    config.update(checkpoint_every_steps=2, keep_step_checkpoints=10)
    full = root / 'full'
    run_retrieval(root, config, '--output_dir', str(full))
    step_file = full / 'checkpoint_01_step000002.pth'  # epoch 1 after 2 of its 4 steps
    assert step_file.is_file()
    resumed = root / 'resumed'
    run_retrieval(root, config, '--output_dir', str(resumed), '--resume', str(step_file))
    a, b = final_weights(full / 'checkpoint_last.pth'), final_weights(resumed / 'checkpoint_last.pth')
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_untrusted_pickle_is_refused_with_the_object_and_the_fix(tmp_path):
    path = tmp_path / 'old.pth'
    torch.save({'model': {'w': torch.ones(2)}, 'args': argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(CheckpointError, match=r'argparse\.Namespace.*--trust_checkpoint .*to-state-dict'):
        load_checkpoint_file(str(path))
    engine.script.trust_checkpoints([str(path)])
    with warnings.catch_warnings(record=True):
        assert torch.equal(load_checkpoint_file(str(path))['model']['w'], torch.ones(2))
    plain = tmp_path / 'plain.pth'
    to_state_dict_file(str(path), str(plain))
    assert torch.equal(torch.load(plain, weights_only=True)['model']['w'], torch.ones(2))


def test_a_corrupt_pickle_is_called_corrupt_not_untrusted(tmp_path):
    path = tmp_path / 'bad.pth'
    path.write_bytes(pickle.dumps({'a': 1})[:-3])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        load_checkpoint_file(str(path))


@pytest.mark.parametrize('name', sorted(n for n in os.listdir(os.path.join(REPO, 'configs'))
                                        if n.endswith('_synthetic.yaml')))
def test_synthetic_configs_need_no_text_encoder_flag(name, tmp_path):
    import Pretrain
    args = Pretrain.parser().parse_args(['--config', os.path.join(REPO, 'configs', name), '--output_dir',
                                         str(tmp_path), '--device', 'cpu'])
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # 'none' must not be reported as a missing BERT folder
        engine.setup(args)
        from models.tokenization import build_tokenizer
        build_tokenizer(args.text_encoder)
    assert args.text_encoder == 'none'


def test_deterministic_runs_are_bit_identical_with_two_threads_and_workers(world):
    root, config = world
    config.update(deterministic=True, num_workers=2)
    config['schedular'] = dict(config['schedular'], epochs=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two intra-op threads: index_put's accumulation order then varies unless deterministic
    try:
        run_retrieval(root, config, '--output_dir', str(root / 'a'))
        assert torch.are_deterministic_algorithms_enabled()
        run_retrieval(root, config, '--output_dir', str(root / 'b'))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    a, b = final_weights(root / 'a' / 'checkpoint_last.pth'), final_weights(root / 'b' / 'checkpoint_last.pth')
    assert all(torch.equal(a[k], b[k]) for k in a)
