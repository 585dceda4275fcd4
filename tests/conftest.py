"""Shared pytest set-up: one CPU thread (the machine has two cores), the repo root importable, the kind of every test
(the markers of pytest.ini), and the synthetic world and tiny pretrained model the learning tests share."""
import collections
import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from tests.helpers import make_deit, make_world, run_pretrain  # noqa: E402

torch.set_num_threads(1)


# ---- the kind of every test: `make test-fast` runs -m "unit or parity", `make test` everything --------------------
# parity: compares with the official tensors of tests/fixtures/parity; learning: trains on the synthetic world and
# asserts a measured margin (minutes); e2e: an entry script, a subprocess, torchrun or a pipeline of several seconds;
# unit: fast and self-contained. Every test file is listed here, also one that marks its tests itself (pytestmark);
# a file holding tests of another kind than its own marks those tests (@pytest.mark.e2e, ...).
KINDS = ('unit', 'parity', 'e2e', 'learning')
KIND_OF_FILE = {
    'test_bf16_curves.py': 'unit',
    'test_codis.py': 'unit',
    'test_codis_learning.py': 'learning',
    'test_configs.py': 'unit',
    'test_data_datasets.py': 'unit',
    'test_data_image_io.py': 'unit',
    'test_data_loader.py': 'unit',
    'test_data_randaugment.py': 'unit',
    'test_data_text.py': 'unit',
    'test_data_transforms.py': 'unit',
    'test_distributed.py': 'e2e',
    'test_entry_contract.py': 'e2e',
    'test_forked_launch.py': 'e2e',
    'test_grounding_eval.py': 'unit',
    'test_grounding_learning.py': 'learning',
    'test_grounding_parity.py': 'parity',
    'test_grounding_picture.py': 'unit',
    'test_image_blind.py': 'unit',
    'test_model_pretrain.py': 'unit',
    'test_nlvr_conversions.py': 'parity',
    'test_nlvr_parity.py': 'parity',
    'test_nlvr_ve_learning.py': 'learning',
    'test_optim.py': 'unit',
    'test_parity_pretrain.py': 'parity',
    'test_plot_run.py': 'e2e',
    'test_pretrain_learning.py': 'learning',
    'test_pretrain_script.py': 'e2e',
    'test_registry.py': 'unit',
    'test_reproduce.py': 'unit',
    'test_retrieval_eval.py': 'unit',
    'test_retrieval_learning.py': 'learning',
    'test_retrieval_parity.py': 'parity',
    'test_robustness.py': 'e2e',
    'test_scheduler.py': 'unit',
    'test_shards.py': 'unit',
    'test_simla_checkpoint.py': 'parity',
    'test_simla_configs.py': 'unit',
    'test_simla_learning.py': 'learning',
    'test_simla_losses.py': 'unit',
    'test_simla_model.py': 'unit',
    'test_simla_parity.py': 'parity',
    'test_speed_paths.py': 'unit',
    'test_synthetic.py': 'unit',
    'test_synthetic_deit.py': 'unit',
    'test_tokenization.py': 'unit',
    'test_utils.py': 'unit',
    'test_ve_accuracy.py': 'unit',
    'test_ve_parity.py': 'parity',
    'test_vit.py': 'unit',
    'test_vlmo_beit.py': 'unit',
    'test_vlmo_data.py': 'unit',
    'test_vlmo_distributed.py': 'e2e',
    'test_vlmo_engine.py': 'unit',
    'test_vlmo_finetune.py': 'e2e',
    'test_vlmo_learning.py': 'learning',
    'test_vlmo_model.py': 'unit',
    'test_vlmo_parity.py': 'parity',
    'test_vlmo_retrieval.py': 'unit',
    'test_vlmo_scripts.py': 'e2e',
    'test_vqa_checkpoint.py': 'parity',
    'test_vqa_eval.py': 'unit',
    'test_vqa_learning.py': 'learning',
    'test_vqa_model.py': 'unit',
    'test_vqa_parity.py': 'parity',
}
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    """Give every test of tests/ the kind of its file unless it carries one itself; refuse unlisted files."""
    unknown, doubled = set(), []
    for item in items:
        if os.path.dirname(os.path.abspath(str(item.path))) != TESTS_DIR:
            continue
        kind = KIND_OF_FILE.get(item.path.name)
        if kind is None:
            unknown.add(item.path.name)
            continue
        own = {mark.name for mark in item.iter_markers() if mark.name in KINDS}
        if len(own) > 1:
            doubled.append(f'{item.nodeid}: {", ".join(sorted(own))}')
        elif not own:
            item.add_marker(kind)
    # the background runs (BACKGROUND below) start when the DeiT stand-in is trained: the tests that train it go
    # first, the tests reading those runs last, so that the runs overlap with everything in between
    def uses(item, names):
        return bool(set(names) & set(getattr(item, 'fixturenames', ())))
    late = [item for item in items if uses(item, BACKGROUND_FIXTURES)]
    early = [item for item in items if item not in late and uses(item, ('synthetic_deit',))]
    if late or early:
        items[:] = early + [item for item in items if item not in late and item not in early] + late
    if unknown or doubled:
        lines = [f'{name} is not in KIND_OF_FILE of tests/conftest.py: add it with one of {", ".join(KINDS)}'
                 for name in sorted(unknown)]
        lines += [f'{test} has more than one kind; keep one' for test in doubled]
        raise pytest.UsageError('tests without a kind:\n  ' + '\n  '.join(lines))


# ---- the tiny pretrained model shared by the learning tests ------------------------------------------------------
TinyPretrained = collections.namedtuple('TinyPretrained', 'checkpoint root output_dir')

# The pretraining run of the learning test (tests/test_pretrain_learning.py); the fine-tuning tests start from its
# checkpoint. configs/Pretrain_synthetic.yaml as the demo runs it, with fewer epochs to fit the CI budget.
TINY_PRETRAIN_OPTS = {'num_workers': 1, 'log_every': 10, 'max_steps_per_epoch': 80, 'schedular.epochs': 2,
                      'warmup_step_size': 5}
TINY_PRETRAIN_THREADS = 1
SYNTHETIC_DEIT_EPOCHS = 4  # the recipe's default (python -m synthetic.deit)


@pytest.fixture(scope='session')
def synthetic_root(request, tmp_path_factory):
    """The synthetic world at its default size (the one `make demo` uses), generated once per test session; the
    background runs that need only the world (VLMo's) start as soon as it exists (when a selected test reads them)."""
    root = make_world(tmp_path_factory.mktemp('synthetic'), scale=1.0, seed=0)
    wanted = request.config.stash.get(WANTED_RUNS, [])
    start_background_runs(request.config, [n for n in wanted if n not in NEEDS_DEIT], root, None, tmp_path_factory)
    return root


@pytest.fixture(scope='session')
def synthetic_deit(request, synthetic_root, tmp_path_factory):
    """The DeiT stand-in of the synthetic recipe (python -m synthetic.deit), trained once per session; the background
    runs that start from it are started as soon as it exists (when a selected test reads them)."""
    from synthetic.deit import DEFAULT_NAME
    deit = make_deit(synthetic_root, tmp_path_factory.mktemp('synthetic_deit') / DEFAULT_NAME,
                     epochs=SYNTHETIC_DEIT_EPOCHS, threads=TINY_PRETRAIN_THREADS)
    wanted = request.config.stash.get(WANTED_RUNS, [])
    start_background_runs(request.config, [n for n in wanted if n in NEEDS_DEIT], synthetic_root, deit,
                          tmp_path_factory)
    return deit


@pytest.fixture(scope='session')
def tiny_pretrained(synthetic_root, synthetic_deit, tmp_path_factory):
    """(checkpoint, root, output_dir) of Pretrain.py run on the synthetic world with configs/Pretrain_synthetic.yaml,
    starting from the synthetic DeiT stand-in as the recipe does."""
    out = tmp_path_factory.mktemp('tiny_pretrain')
    root = synthetic_root
    checkpoint = run_pretrain(root, out, deit=synthetic_deit, seed=42, val_file=f'{root}/retrieval_test.json',
                              threads=TINY_PRETRAIN_THREADS, **TINY_PRETRAIN_OPTS)
    return TinyPretrained(checkpoint, str(root), str(out))


# ---- runs in the background: started early, read by tests ordered last ---------------------------------------------
# Each module of BACKGROUND (fixture name -> module) has `start(root, deit, work) -> (runs, BackgroundRun)`: the
# VLMo, CODIS and SIMLA learning runs (tests/vlmo_runs.py, tests/codis_runs.py, tests/simla_runs.py), each a sequence
# of scripts run by a thread of this process (in the lanes of AFTER), beside the rest of the suite: VLMo's as soon as
# the synthetic world exists (it does not use the DeiT stand-in, so it fills the minutes the stand-in trains), the
# others (NEEDS_DEIT) when the DeiT stand-in is trained (the first learning test). The fixture of the same name waits
# for its runs and returns their output folders; the tests reading them are ordered last.
BACKGROUND = {'vlmo_runs': 'tests.vlmo_runs', 'codis_runs': 'tests.codis_runs', 'simla_runs': 'tests.simla_runs'}
NEEDS_DEIT = {'codis_runs', 'simla_runs'}
# Two lanes beside the foreground: VLMo then CODIS in one, SIMLA (the longest) alone in the other; a run named here
# starts when the run it names ends (when both are started), the others at once.
AFTER = {'codis_runs': 'vlmo_runs'}
BACKGROUND_FIXTURES = set(BACKGROUND)
WANTED_RUNS = pytest.StashKey[list]()
STARTED_RUNS = pytest.StashKey[dict]()


def pytest_collection_finish(session):
    used = set()
    for item in session.items:
        used |= BACKGROUND_FIXTURES & set(getattr(item, 'fixturenames', ()))
    session.config.stash[WANTED_RUNS] = [name for name in BACKGROUND if name in used]


def start_background_runs(config, names, root, deit, tmp_path_factory):
    """Start the runs of `names` not started yet, each after the run AFTER names (if started); killed at the
    session's end."""
    import importlib
    started = config.stash.setdefault(STARTED_RUNS, {})
    for name in names:
        if name not in started:
            previous = started[AFTER[name]][1] if AFTER.get(name) in started else None
            runs, background = importlib.import_module(BACKGROUND[name]).start(
                str(root), deit, tmp_path_factory.mktemp(name), after=previous)
            config.add_cleanup(background.stop)
            started[name] = (runs, background)
    return [started[name] for name in names]


def _background_fixture(name):
    @pytest.fixture(scope='session', name=name)
    def fixture(request, synthetic_root, synthetic_deit, tmp_path_factory):
        (runs, background), = start_background_runs(request.config, [name], synthetic_root, synthetic_deit,
                                                    tmp_path_factory)
        background.wait()
        return runs
    fixture.__doc__ = (f"{BACKGROUND[name]}'s output folders, once its runs have ended (an AssertionError with "
                       f"the log if one failed).")
    return fixture


codis_runs = _background_fixture('codis_runs')
simla_runs = _background_fixture('simla_runs')


@pytest.fixture(scope='session')
def vlmo_runs(request, synthetic_root, tmp_path_factory):
    """tests/vlmo_runs.py's output folders, once its runs have ended (an AssertionError with the log if one failed);
    started by synthetic_root, without the DeiT stand-in."""
    (runs, background), = start_background_runs(request.config, ['vlmo_runs'], synthetic_root, None,
                                                tmp_path_factory)
    background.wait()
    return runs
