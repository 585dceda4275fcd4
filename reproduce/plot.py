"""`python -m reproduce plot RUN_DIR [RUN_DIR ...] --out run.png`: pictures of training runs.

From each run folder: train_steps.jsonl (one JSON object per logged step: epoch, step, lr, samples_per_s,
data_wait_s, loss_*, peak_mem_gb on CUDA) gives one panel per loss, the learning rate, the throughput and the peak
memory; log.txt (one JSON line per epoch) gives the evaluation metrics per epoch. One colour per run. The x axis of
step series is the epoch with its fraction (step + 1) / steps per epoch, so runs of different lengths line up.
"""
import json
import os

STEP_PANELS = ('lr', 'samples_per_s', 'peak_mem_gb')
PANEL_TITLES = {'lr': 'learning rate', 'samples_per_s': 'throughput (samples/s)', 'peak_mem_gb': 'peak memory (GB)'}
# epoch metrics drawn by default: the headline numbers of each task
HEADLINE_SUFFIXES = ('_r_mean', 'txt_r1', 'img_r1', '_acc', 'vqa_acc', '_d')


def read_jsonl(path):
    """Records of a JSON-lines file; lines that are not JSON objects (tables, blank lines) are skipped."""
    out = []
    if not os.path.isfile(path):
        return out
    with open(path, encoding='utf-8') as f:
        for line in f:
            line = line.strip()
            if not line.startswith('{'):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written while we read
            if isinstance(record, dict):
                out.append(record)
    return out


def step_series(records):
    """{key: (x, y)} of every numeric per-step key; x = epoch + (step + 1) / steps per epoch."""
    per_epoch = {}
    for r in records:
        if 'epoch' in r and 'step' in r:
            per_epoch[r['epoch']] = max(per_epoch.get(r['epoch'], 0), int(r['step']) + 1)
    steps_per_epoch = max(per_epoch.values()) if per_epoch else 1
    series = {}
    for r in records:
        if 'epoch' not in r or 'step' not in r:
            continue
        x = r['epoch'] + (int(r['step']) + 1) / steps_per_epoch
        for key, value in r.items():
            if key in ('epoch', 'step') or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            xs, ys = series.setdefault(key, ([], []))
            xs.append(x)
            ys.append(value)
    return series


def epoch_series(records, keys=None):
    """{key: (epochs, values)} of the per-epoch evaluation metrics (train_* averages left out)."""
    series = {}
    for r in records:
        if 'epoch' not in r:
            continue
        for key, value in r.items():
            if key == 'epoch' or key.startswith('train_') or isinstance(value, bool) \
                    or not isinstance(value, (int, float)):
                continue
            if keys is not None and key not in keys:
                continue
            xs, ys = series.setdefault(key, ([], []))
            xs.append(r['epoch'])
            ys.append(value)
    return series


def default_epoch_keys(all_keys):
    keys = [k for k in all_keys if k.endswith(HEADLINE_SUFFIXES) and not k.endswith(('txt_r_mean', 'img_r_mean'))]
    return keys or list(all_keys)


def load_run(run_dir):
    steps = read_jsonl(os.path.join(run_dir, 'train_steps.jsonl'))
    epochs = read_jsonl(os.path.join(run_dir, 'log.txt'))
    return step_series(steps), epoch_series(epochs)


def panels_of(runs, epoch_keys=None):
    """The ordered panel list [(kind, key)] for a set of loaded runs."""
    step_keys, epoch_all = [], []
    for steps, epochs in runs:
        step_keys += [k for k in steps if k not in step_keys]
        epoch_all += [k for k in epochs if k not in epoch_all]
    losses = sorted(k for k in step_keys if k.startswith('loss'))
    panels = [('step', k) for k in losses] + [('step', k) for k in STEP_PANELS if k in step_keys]
    chosen = epoch_keys if epoch_keys else default_epoch_keys(epoch_all)
    panels += [('epoch', k) for k in chosen if k in epoch_all]
    return panels


def plot_runs(run_dirs, out=None, labels=None, epoch_keys=None, columns=3, panel_size=(3.6, 2.5), dpi=80):
    """Draw the runs; returns (figure, {'<label>/<key>': number of points drawn}). Saves a PNG when `out` is set."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    labels = list(labels) if labels else [os.path.basename(os.path.normpath(d)) or d for d in run_dirs]
    if len(set(labels)) != len(labels):  # same folder names under different parents
        labels = [os.path.normpath(d) for d in run_dirs]
    runs = [load_run(d) for d in run_dirs]
    panels = panels_of(runs, epoch_keys)
    if not panels:
        raise ValueError(f'nothing to plot: no train_steps.jsonl or log.txt records in {", ".join(run_dirs)}')
    columns = max(1, min(columns, len(panels)))
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(panel_size[0] * columns, panel_size[1] * rows), squeeze=False)
    colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
    drawn = {}
    for ax, (kind, key) in zip(axes.flat, panels):
        for i, ((steps, epochs), label) in enumerate(zip(runs, labels)):
            source = steps if kind == 'step' else epochs
            if key not in source:
                continue
            xs, ys = source[key]
            colour = colours[i % len(colours)]
            if kind == 'epoch':
                ax.plot(xs, ys, marker='o', markersize=3, color=colour, label=label)
            else:
                ax.plot(xs, ys, marker='.' if len(xs) < 30 else None, markersize=3, linewidth=1.2, color=colour,
                        label=label)
            drawn[f'{label}/{key}'] = len(xs)
        ax.set_title(PANEL_TITLES.get(key, key), fontsize=9)
        ax.set_xlabel('epoch', fontsize=8)
        ax.tick_params(labelsize=7)
        if key == 'lr':
            ax.ticklabel_format(axis='y', style='sci', scilimits=(-3, 3))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis('off')
    handles, names = [], []
    for ax in axes.flat:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc='upper center', ncol=min(len(names), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (panel_size[1] * rows)))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        fig.savefig(out, dpi=dpi)
    return fig, drawn
