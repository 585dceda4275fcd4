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

from tests.helpers import SYNTHETIC_DEIT, BackgroundRun, make_world, pretrain_argv  # noqa: E402

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
    'test_image_blind_margins.py': 'learning',
    'test_model_pretrain.py': 'unit',
    'test_nlvr_conversions.py': 'parity',
    'test_nlvr_parity.py': 'parity',
    'test_nlvr_ve_learning.py': 'learning',
    'test_optim.py': 'unit',
    'test_parity_pretrain.py': 'parity',
    'test_plot_run.py': 'e2e',
    'test_pretrain_learning.py': 'learning',
    'test_pretrain_script.py': 'e2e',
    'test_probe_vision.py': 'e2e',
    'test_registry.py': 'unit',
    'test_reproduce.py': 'unit',
    'test_rerank_sweep.py': 'e2e',
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
    # the background runs (below) start with the session: the tests that read them go after the others (the
    # family runs' readers last), so that the runs overlap with everything before
    def uses(item, names):
        return bool(set(names) & set(getattr(item, 'fixturenames', ())))
    last = [item for item in items if uses(item, BACKGROUND_FIXTURES)]
    later = [item for item in items if item not in last and uses(item, FOREGROUND_READERS)]
    if last or later:
        items[:] = [item for item in items if item not in last and item not in later] + later + last
    if unknown or doubled:
        lines = [f'{name} is not in KIND_OF_FILE of tests/conftest.py: add it with one of {", ".join(KINDS)}'
                 for name in sorted(unknown)]
        lines += [f'{test} has more than one kind; keep one' for test in doubled]
        raise pytest.UsageError('tests without a kind:\n  ' + '\n  '.join(lines))


# ---- the DeiT stand-in and the tiny pretrained model shared by the learning tests --------------------------------
TinyPretrained = collections.namedtuple('TinyPretrained', 'checkpoint root output_dir')

# The pretraining run of the learning test (tests/test_pretrain_learning.py); the fine-tuning tests start from its
# checkpoint. configs/Pretrain_synthetic.yaml as the demo runs it, with fewer epochs to fit the CI budget.
TINY_PRETRAIN_OPTS = {'num_workers': 1, 'log_every': 10, 'max_steps_per_epoch': 80, 'schedular.epochs': 2,
                      'warmup_step_size': 5}
TINY_PRETRAIN_THREADS = 1
# The DeiT stand-in the tiny pretraining (and CODIS's and SIMLA's) start from is committed (tests/helpers.py:
# SYNTHETIC_DEIT), 2.5 CPU-minutes the suite no longer pays; a short run of its command is tested live
# (tests/test_synthetic_deit.py).


def committed_deit(root):
    """SYNTHETIC_DEIT, after checking that it was trained on the world under `root`."""
    from synthetic.world import check_identity
    check_identity(torch.load(SYNTHETIC_DEIT, map_location='cpu', weights_only=True).get('world'), root,
                   SYNTHETIC_DEIT, 'retrain it as tests/fixtures/synthetic_pretrained/README.md says')
    return SYNTHETIC_DEIT


# ---- runs in the background: started with the session, read by tests ordered after the rest ------------------------
# Everything that trains on the synthetic world for minutes runs as scripts in the background (tests/helpers.py:
# BackgroundRun, two scripts at a time, each forked once the scripts it needs have ended) beside the unit, parity
# and e2e tests, from the moment the synthetic world exists (an autouse fixture creates it first when a selected test
# needs one of these runs): the tiny ALBEF pretraining from the committed DeiT stand-in (Pretrain.py), which the
# foreground learning tests read (`tiny_pretrained`), and the VLMo, CODIS and SIMLA learning runs (tests/vlmo_runs.py,
# tests/codis_runs.py, tests/simla_runs.py: `start(root, deit, work) -> (runs, BackgroundRun)`). A fixture waits for
# its run and returns its outputs; the tests that read them come after the others, the family runs' readers last.
# ALBEF's fine-tunings against their image-blind controls (tests/margin_runs.py) start from a committed pretraining.
BACKGROUND = {'vlmo_runs': 'tests.vlmo_runs', 'codis_runs': 'tests.codis_runs', 'simla_runs': 'tests.simla_runs',
              'margin_runs': 'tests.margin_runs'}
FOREGROUND_READERS = ('tiny_pretrained',)  # fixtures that wait for a background run
BACKGROUND_FIXTURES = set(BACKGROUND)
WANTED_RUNS = pytest.StashKey[list]()
STARTED_RUNS = pytest.StashKey[dict]()


def pytest_collection_finish(session):
    used = set()
    for item in session.items:
        used |= set(getattr(item, 'fixturenames', ()))
    session.config.stash[WANTED_RUNS] = [name for name in (*FOREGROUND_READERS, *BACKGROUND) if name in used]


def start_background_runs(config, root, tmp_path_factory):
    """Start every wanted run (WANTED_RUNS) not started yet; killed at the session's end. Returns {name: (outputs,
    BackgroundRun)}."""
    import importlib
    started = config.stash.setdefault(STARTED_RUNS, {})
    wanted = [name for name in config.stash.get(WANTED_RUNS, []) if name not in started]
    deit = committed_deit(root) if wanted else None
    for name in wanted:
        if name == 'tiny_pretrained':
            work = tmp_path_factory.mktemp('tiny_pretrain')
            out = work / 'pretrain'
            outputs = TinyPretrained(str(out / 'checkpoint_last.pth'), str(root), str(out))
            background = BackgroundRun([('Pretrain.py', pretrain_argv(root, out, deit, seed=42,
                                                                      val_file=f'{root}/retrieval_test.json',
                                                                      **TINY_PRETRAIN_OPTS))],
                                       work / 'runs.log', threads=TINY_PRETRAIN_THREADS, priority=0)
        else:
            module, _, function = BACKGROUND[name].partition(':')
            outputs, background = getattr(importlib.import_module(module), function or 'start')(
                str(root), deit, tmp_path_factory.mktemp(name))
        config.add_cleanup(background.stop)
        started[name] = (outputs, background)
    return started


@pytest.fixture(scope='session')
def synthetic_root(request, tmp_path_factory):
    """The synthetic world at its default size (the one `make demo` uses), generated once per test session; the
    background runs (WANTED_RUNS) start as soon as it exists."""
    root = make_world(tmp_path_factory.mktemp('synthetic'), scale=1.0, seed=0)
    start_background_runs(request.config, root, tmp_path_factory)
    return root


@pytest.fixture(scope='session', autouse=True)
def _background_runs_start_first(request):
    """Creates the synthetic world, and with it the background runs, before the first test when a selected test
    reads one of them."""
    if request.config.stash.get(WANTED_RUNS, []):
        request.getfixturevalue('synthetic_root')


def _wait_for(request, name):
    started = request.config.stash[STARTED_RUNS]
    outputs, background = started[name]
    background.wait()
    return outputs


@pytest.fixture(scope='session')
def synthetic_deit(synthetic_root):
    """The path of the committed DeiT stand-in of the synthetic recipe (python -m synthetic.deit, its default 4
    epochs, one thread), checked to be of this world."""
    return committed_deit(synthetic_root)


@pytest.fixture(scope='session')
def tiny_pretrained(request, synthetic_root):
    """(checkpoint, root, output_dir) of Pretrain.py run on the synthetic world with configs/Pretrain_synthetic.yaml
    and TINY_PRETRAIN_OPTS, starting from the synthetic DeiT stand-in as the recipe does (in the background)."""
    return _wait_for(request, 'tiny_pretrained')


def _background_fixture(name):
    @pytest.fixture(scope='session', name=name)
    def fixture(request, synthetic_root):
        return _wait_for(request, name)
    fixture.__doc__ = (f"{BACKGROUND[name]}'s output folders, once its runs have ended (an AssertionError with "
                       f"the log if one failed).")
    return fixture


vlmo_runs = _background_fixture('vlmo_runs')
codis_runs = _background_fixture('codis_runs')
simla_runs = _background_fixture('simla_runs')
margin_runs = _background_fixture('margin_runs')
