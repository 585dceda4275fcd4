"""`python -m reproduce report OUT...`: metrics.json files of finished runs beside the paper's numbers.

Each OUT is an output folder of `python -m reproduce run` (its reproduce.json names the cell and the mode) or of an
entry script run by hand, given as `CELL=DIR` (or found from the config and checkpoint recorded in metrics.json).
Numbers are shown in percent: fractions (NLVR2, SNLI-VE and grounding accuracies) are multiplied by 100.
"""
import glob
import json
import os
from dataclasses import dataclass
from typing import Optional

RUN_RECORD = 'reproduce.json'
PAPER_GPUS = 8  # every fine-tuning run of the paper: 8 GPUs, the configs' batch sizes per GPU


@dataclass
class Row:
    metric_id: str
    ours: Optional[float]
    paper: Optional[float]
    tolerance: Optional[float]
    verdict: str
    run: str
    mode: str
    note: str = ''

    @property
    def difference(self):
        if self.ours is None or self.paper is None:
            return None
        return self.ours - self.paper


def to_percent(value, unit):
    return 100.0 * float(value) if unit == 'fraction' else float(value)


def read_json(path):
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def infer_cell(table, metrics_doc):
    """The cell whose final step matches the config and checkpoint recorded in metrics.json (None if not unique)."""
    config = os.path.normpath(str(metrics_doc.get('config', '')))
    ckpt = os.path.basename(str(metrics_doc.get('checkpoint', '') or ''))
    evaluate = bool(metrics_doc.get('evaluate_only'))
    found = []
    for cell in table.cells:
        for mode, steps in cell.commands.items():
            last = steps[-1]
            if not config.endswith(os.path.normpath(last.config)):
                continue
            if len(steps) == 1 and (mode == 'evaluate') != evaluate:
                continue
            start = cell.pretrained if last.checkpoint == 'pretrained' else \
                cell.finetuned if last.checkpoint == 'finetuned' else None
            if start and ckpt != start:
                continue
            found.append((cell, mode, bool(start)))
    exact = [(c, m) for c, m, named in found if named]  # the released file named in metrics.json decides first
    if len(exact) == 1:
        return exact[0]
    return (found[0][0], found[0][1]) if len(found) == 1 else (None, None)


def parse_target(arg, table):
    """'CELL=DIR' or 'DIR' -> (cell id or None, dir)."""
    head, sep, tail = arg.partition('=')
    if sep and any(c.id == head for c in table.cells):
        return head, tail
    return None, arg


def rows_for_run(table, arg):
    """Report rows of one output folder."""
    cell_id, out = parse_target(arg, table)
    record_path = os.path.join(out, RUN_RECORD)
    record = read_json(record_path) if os.path.isfile(record_path) else {}
    metrics_path = os.path.join(out, 'metrics.json')
    failed = [code for code in record.get('returncodes', []) if code]
    if failed:
        return [Row(cell_id or record.get('cell', '?'), None, None, None, 'failed', out, record.get('mode', '?'),
                    f'a step exited with status {failed[0]}; its output is above the failure line of the run log')]
    if not os.path.isfile(metrics_path):
        return [Row(cell_id or record.get('cell', '?'), None, None, None, 'missing', out, record.get('mode', '?'),
                    'no metrics.json (the run has not finished, or failed: see its log)')]
    doc = read_json(metrics_path)
    mode = record.get('mode')
    cell_id = cell_id or record.get('cell')
    if cell_id:
        cell = table.cell(cell_id)
    else:
        cell, mode = infer_cell(table, doc)
        if cell is None:
            return [Row('?', None, None, None, 'unknown cell', out, '?',
                        f'cannot tell the cell from config {doc.get("config")!r} and checkpoint '
                        f'{doc.get("checkpoint")!r}; name it as CELL=DIR')]
    if mode is None:
        mode = 'evaluate' if doc.get('evaluate_only') else 'train'
    flat = doc.get('metrics')
    rows = []
    for metric in cell.metrics:
        metric_id = f'{cell.id}.{metric.name}'
        tol = cell.tolerance_of(metric, mode)
        note = metric.note + ('' if metric.confirmed else ' (paper number unconfirmed)')
        nproc = record.get('nproc')
        if mode == 'train' and metric.paper is not None and nproc and nproc != PAPER_GPUS:
            note += f' (trained on {nproc} process(es); the paper used {PAPER_GPUS} GPUs, batch sizes are per GPU)'
        if metric.server:
            results = sorted(glob.glob(os.path.join(out, 'result', '*.json')))
            where = doc.get('result_file') or (results[-1] if results else 'result/*.json')
            rows.append(Row(metric_id, None, metric.paper, tol, 'server', out, mode,
                            f'submit {where} to the EvalAI VQA challenge'))
            continue
        if not isinstance(flat, dict):
            rows.append(Row(metric_id, None, metric.paper, tol, 'missing', out, mode,
                            'metrics.json has no "metrics" field (written by an older script version): rerun'))
            continue
        if metric.key not in flat or flat[metric.key] is None:
            rows.append(Row(metric_id, None, metric.paper, tol, 'missing', out, mode,
                            f'no {metric.key!r} in metrics.json (has {", ".join(sorted(flat)[:8])})'))
            continue
        ours = to_percent(flat[metric.key], metric.unit)
        if metric.paper is None:
            verdict = 'no paper number'
        elif tol is None:
            verdict = 'no tolerance'
        else:
            verdict = 'within' if abs(ours - metric.paper) <= tol + 1e-9 else 'OUTSIDE'
        rows.append(Row(metric_id, ours, metric.paper, tol, verdict, out, mode, note.strip()))
    return rows


def collect(table, args):
    rows = []
    for arg in args:
        rows.extend(rows_for_run(table, arg))
    return rows


def _num(x, signed=False):
    if x is None:
        return '—'
    return f'{x:+.2f}' if signed else f'{x:.2f}'


def markdown(rows):
    """The report as a markdown table (percent; difference = ours - paper)."""
    lines = ['| cell | ours | paper | difference | tolerance | verdict | mode | run | note |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        tol = '—' if r.tolerance is None or r.paper is None else f'±{r.tolerance:.1f}'
        lines.append(f'| {r.metric_id} | {_num(r.ours)} | {_num(r.paper)} | {_num(r.difference, True)} | {tol} | '
                     f'{r.verdict} | {r.mode} | {r.run} | {r.note} |')
    counts = {}
    for r in rows:
        counts[r.verdict] = counts.get(r.verdict, 0) + 1
    summary = ', '.join(f'{n} {v}' for v, n in sorted(counts.items()))
    return '\n'.join(lines) + f'\n\n{len(rows)} numbers: {summary}.\n'
