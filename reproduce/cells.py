"""The table of cells (reproduce/cells.yaml): loading, validation and the commands a cell runs.

A cell is one row of a paper table (several metrics, e.g. Flickr30K TR/IR R@1/5/10 of the 4M model); its id is
`retrieval.flickr.ft.4M` and a single number is `retrieval.flickr.ft.4M.tr_r1`. See the header of cells.yaml for
the format.
"""
import fnmatch
import os
import shlex
from dataclasses import dataclass, field
from typing import Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CELLS = os.path.join(REPO_ROOT, 'reproduce', 'cells.yaml')

MODES = ('train', 'evaluate')
UNITS = ('percent', 'fraction')
LAYOUTS = ('pretrain', 'retrieval', 'vqa', 'ta', 'nlvr', 've')
# the checkpoint layout a fine-tuned file of each task has (grounding fine-tunes the retrieval model)
TASK_LAYOUT = {'pretrain': 'pretrain', 'retrieval': 'retrieval', 'grounding': 'retrieval', 'vqa': 'vqa',
               'nlvr': 'nlvr', 've': 've', 'pretrain_nlvr': 'ta'}
CHECKPOINT_ROLES = ('pretrained', 'finetuned', 'none', 'optional')
# where a released checkpoint is looked for when --checkpoint is not given
CHECKPOINT_DIR = 'checkpoints'


class CellError(ValueError):
    """The cells file is malformed, or a cell id / option does not exist."""


@dataclass
class Metric:
    name: str
    key: Optional[str]
    unit: str
    paper: Optional[float]
    server: bool = False
    confirmed: bool = True
    note: str = ''
    tolerance: dict = field(default_factory=dict)


@dataclass
class Step:
    script: str
    config: str
    data: str
    checkpoint: str
    name: str = ''
    args: list = field(default_factory=list)
    opts: dict = field(default_factory=dict)


@dataclass
class Cell:
    id: str
    family: str
    task: str
    table: str
    pretraining: str
    pretrained: Optional[str]
    finetuned: Optional[str]
    commands: dict
    metrics: list
    tolerance: dict
    finetuned_note: str = ''

    def steps(self, mode):
        if mode not in self.commands:
            raise CellError(f'cell {self.id} has no {mode!r} command (it has: {", ".join(self.commands)})')
        return self.commands[mode]

    def tolerance_of(self, metric, mode):
        """Tolerance in points for `metric` when the number comes from a `mode` run (train | evaluate)."""
        value = metric.tolerance.get(mode, self.tolerance.get(mode))
        return None if value is None else float(value)

    def datasets(self, mode=None):
        """Names of the datasets the cell's steps read, in order of first use."""
        names = []
        for m in ([mode] if mode else list(self.commands)):
            for step in self.commands.get(m, []):
                if step.data not in names:
                    names.append(step.data)
        return names


@dataclass
class Table:
    path: str
    checkpoints: dict
    datasets: dict
    cells: list
    tolerance_rule: str = ''

    def cell(self, cell_id):
        for cell in self.cells:
            if cell.id == cell_id:
                return cell
        near = [c.id for c in self.cells if cell_id.split('.')[0] in c.id] or [c.id for c in self.cells]
        raise CellError(f'no cell {cell_id!r} in {self.path}; cells are e.g. {", ".join(near[:8])} '
                        f'(python -m reproduce list shows all)')

    def select(self, pattern=None):
        """Cells whose id matches the shell-style `pattern` (all when None)."""
        if not pattern:
            return list(self.cells)
        if not any(ch in pattern for ch in '*?['):
            pattern = pattern + '*'
        return [c for c in self.cells if fnmatch.fnmatch(c.id, pattern)]

    def metric(self, metric_id):
        """(cell, metric) of `cell_id.metric_name`."""
        cell_id, _, name = metric_id.rpartition('.')
        cell = self.cell(cell_id)
        for metric in cell.metrics:
            if metric.name == name:
                return cell, metric
        raise CellError(f'cell {cell_id} has no metric {name!r}: {", ".join(m.name for m in cell.metrics)}')


# ---- loading and validation -------------------------------------------------------------------------------------
def _require(mapping, key, where):
    if key not in mapping:
        raise CellError(f'{where}: missing field `{key}`')
    return mapping[key]


def _check_keys(mapping, allowed, where):
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise CellError(f'{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}')


def _step(raw, where, datasets):
    _check_keys(raw, {'name', 'script', 'config', 'data', 'checkpoint', 'args', 'opts'}, where)
    step = Step(script=_require(raw, 'script', where), config=_require(raw, 'config', where),
                data=_require(raw, 'data', where), checkpoint=str(_require(raw, 'checkpoint', where)),
                name=raw.get('name') or '', args=[str(a) for a in raw.get('args') or []],
                opts=dict(raw.get('opts') or {}))
    if step.data not in datasets:
        raise CellError(f'{where}: data {step.data!r} is not a dataset of the file ({", ".join(datasets)})')
    if step.checkpoint not in CHECKPOINT_ROLES and not step.checkpoint.startswith('step:'):
        raise CellError(f'{where}: checkpoint {step.checkpoint!r} must be one of {CHECKPOINT_ROLES} or '
                        f'step:<earlier step>/<file>')
    return step


def _metric(raw, where):
    _check_keys(raw, {'name', 'key', 'unit', 'paper', 'server', 'confirmed', 'note', 'tolerance'}, where)
    metric = Metric(name=_require(raw, 'name', where), key=raw.get('key'), unit=_require(raw, 'unit', where),
                    paper=None if raw.get('paper') is None else float(raw['paper']),
                    server=bool(raw.get('server', False)), confirmed=bool(raw.get('confirmed', True)),
                    note=str(raw.get('note') or ''), tolerance=dict(raw.get('tolerance') or {}))
    if metric.unit not in UNITS:
        raise CellError(f'{where}: unit {metric.unit!r} must be one of {UNITS}')
    if not metric.server and not metric.key:
        raise CellError(f'{where}: a metric needs `key` (its name in metrics.json) unless `server: true`')
    return metric


def parse_table(raw, path='<cells>'):
    """Validate the loaded YAML document and build a Table."""
    if not isinstance(raw, dict) or raw.get('version') != 1:
        raise CellError(f'{path}: expected a mapping with `version: 1`')
    _check_keys(raw, {'version', 'tolerance_rule', 'checkpoints', 'datasets', 'cells'}, path)
    checkpoints = dict(raw.get('checkpoints') or {})
    for name, info in checkpoints.items():
        if info.get('layout') not in LAYOUTS:
            raise CellError(f'{path}: checkpoint {name}: layout must be one of {LAYOUTS}')
    datasets = dict(raw.get('datasets') or {})
    for name, info in datasets.items():
        for i, entry in enumerate(info.get('files') or []):
            where = f'{path}: dataset {name}, file {i}'
            _check_keys(entry, {'key', 'path', 'format', 'role', 'expect', 'expect_source'}, where)
            for key in ('path', 'format', 'role'):
                _require(entry, key, where)
            if entry['role'] not in ('train', 'eval'):
                raise CellError(f'{where}: role must be train or eval')
            if isinstance(entry.get('expect'), dict) and entry.get('expect_source') not in ('paper', 'public'):
                raise CellError(f'{where}: counts need expect_source: paper | public')
    cells, seen = [], set()
    for i, rc in enumerate(raw.get('cells') or []):
        where = f'{path}: cell {rc.get("id", i)}'
        _check_keys(rc, {'id', 'family', 'task', 'table', 'pretraining', 'pretrained', 'finetuned', 'finetuned_note',
                         'commands', 'metrics', 'tolerance'}, where)
        cell_id = _require(rc, 'id', where)
        if cell_id in seen:
            raise CellError(f'{where}: duplicate id')
        seen.add(cell_id)
        commands = {}
        for mode, steps in (_require(rc, 'commands', where) or {}).items():
            if mode not in MODES:
                raise CellError(f'{where}: command mode {mode!r} must be one of {MODES}')
            commands[mode] = [_step(s, f'{where} {mode} step {j}', datasets) for j, s in enumerate(steps)]
            names = [s.name for s in commands[mode][:-1]]
            if '' in names or len(set(names)) != len(names):
                raise CellError(f'{where} {mode}: every step but the last needs a unique `name` (its sub-folder)')
        for role in ('pretrained', 'finetuned'):
            name = rc.get(role)
            if name and name not in checkpoints:
                raise CellError(f'{where}: {role} {name!r} is not listed under checkpoints')
        metrics = [_metric(m, f'{where} metric {j}') for j, m in enumerate(_require(rc, 'metrics', where))]
        cells.append(Cell(id=cell_id, family=_require(rc, 'family', where), task=_require(rc, 'task', where),
                          table=_require(rc, 'table', where), pretraining=str(_require(rc, 'pretraining', where)),
                          pretrained=rc.get('pretrained'), finetuned=rc.get('finetuned'), commands=commands,
                          metrics=metrics, tolerance=dict(rc.get('tolerance') or {}),
                          finetuned_note=str(rc.get('finetuned_note') or '')))
    return Table(path=path, checkpoints=checkpoints, datasets=datasets, cells=cells,
                 tolerance_rule=str(raw.get('tolerance_rule') or ''))


def load_yaml(path):
    from ruamel.yaml import YAML
    with open(path, encoding='utf-8') as f:
        return YAML(typ='safe').load(f)


def load_table(path=None):
    """Read and validate a cells file (default reproduce/cells.yaml)."""
    path = path or DEFAULT_CELLS
    return parse_table(load_yaml(path), path)


# ---- commands ---------------------------------------------------------------------------------------------------
def load_config(config_path):
    """A config file's top-level mapping (to know which keys it has and whether they hold a list or a string)."""
    full = config_path if os.path.isabs(config_path) else os.path.join(REPO_ROOT, config_path)
    return load_yaml(full) or {}


def _data_path(data_root, rel):
    rel = str(rel)
    return os.path.normpath(os.path.join(data_root, rel)) if data_root else rel


def _yaml_list(items):
    return '[' + ','.join(items) + ']'


def data_opts(table, dataset_name, config_path, data_root):
    """`key=value` overrides pointing the config's file keys and image roots at the files under `data_root`.

    Keys the config holds as a list (train_file: [..]) get a list, the others one path; keys the config does not
    have are left out (the scripts reject unknown keys).
    """
    dataset = table.datasets[dataset_name]
    per_key = {}
    for entry in dataset.get('files') or []:
        if entry.get('key'):
            per_key.setdefault(entry['key'], []).append(_data_path(data_root, entry['path']))
    for key, rel in (dataset.get('roots') or {}).items():
        per_key[key] = [_data_path(data_root, rel)]
    config = load_config(config_path)
    opts = []
    for key, paths in per_key.items():
        if key not in config:
            continue
        if isinstance(config[key], list):
            opts.append(f'{key}={_yaml_list(paths)}')
        elif len(paths) == 1:
            opts.append(f'{key}={paths[0]}')
        else:
            raise CellError(f'dataset {dataset_name}: {len(paths)} files for {key}, but {config_path} holds one path')
    return opts


def released_path(name, data_root):
    """Where a released checkpoint is looked for when --checkpoint is not given: DATA_ROOT/checkpoints/NAME."""
    return _data_path(data_root, os.path.join(CHECKPOINT_DIR, name))


def step_output(step, index, steps, output_dir):
    """The last step writes into output_dir itself; earlier steps into output_dir/<step name>."""
    return output_dir if index == len(steps) - 1 else os.path.join(output_dir, step.name)


def resolve_checkpoint(cell, step, index, steps, output_dir, data_root, checkpoint=None):
    """The --checkpoint value of a step ('' for none); `checkpoint` (the user's --checkpoint) replaces the first
    step's input. Raises CellError when a required file is not known."""
    role = step.checkpoint
    if role.startswith('step:'):
        name, _, filename = role[len('step:'):].partition('/')
        for other in steps[:index]:
            if other.name == name:
                return os.path.join(step_output(other, steps.index(other), steps, output_dir), filename)
        raise CellError(f'cell {cell.id}: step {index} reads {role!r} but no earlier step is named {name!r}')
    if index == 0 and checkpoint:
        return checkpoint
    if role == 'none' or role == 'optional':
        return ''
    released = cell.pretrained if role == 'pretrained' else cell.finetuned
    if not released:
        hint = f' ({cell.finetuned_note})' if cell.finetuned_note else ''
        raise CellError(f'cell {cell.id}: no released {role} checkpoint{hint}; pass your file with --checkpoint')
    return released_path(released, data_root)


def build_commands(table, cell, mode, data_root, output_dir, checkpoint=None, torchrun=0, python='python',
                   extra=()):
    """[(argv, output_dir)] of every step of `cell` in `mode`; argv starts with `python` (or torchrun)."""
    steps = cell.steps(mode)
    out = []
    for index, step in enumerate(steps):
        step_out = step_output(step, index, steps, output_dir)
        launcher = ([python, '-m', 'torch.distributed.run', f'--nproc_per_node={torchrun}'] if torchrun
                    else [python])
        argv = launcher + [step.script, '--config', step.config, '--output_dir', step_out]
        ckpt = resolve_checkpoint(cell, step, index, steps, output_dir, data_root, checkpoint)
        if ckpt:
            argv += ['--checkpoint', ckpt]
        argv += step.args
        for opt in data_opts(table, step.data, step.config, data_root):
            argv += ['--opt', opt]
        for key, value in step.opts.items():
            argv += ['--opt', f'{key}={value}']
        argv += list(extra)
        out.append((argv, step_out))
    return out


def shell_line(argv):
    return shlex.join(argv)
