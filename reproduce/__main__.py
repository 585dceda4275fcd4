"""python -m reproduce list|check|run|report|docs|plot (see docs/REPRODUCE.md)."""
import argparse
import json
import os
import subprocess
import sys
import time

from .cells import DEFAULT_CELLS, REPO_ROOT, CellError, build_commands, load_table, shell_line


def _images_arg(value):
    if value == 'all':
        return 'all'
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'--images takes "all" or a number, not {value!r}') from None
    if n < 0:
        raise argparse.ArgumentTypeError('--images must be >= 0')
    return n


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--cells', default=DEFAULT_CELLS, help='the cells file (default: reproduce/cells.yaml)')
    p = argparse.ArgumentParser(prog='python -m reproduce', description='Reproduce the ALBEF paper tables, one '
                                'command per table cell (docs/REPRODUCE.md).')
    sub = p.add_subparsers(dest='command', required=True)

    s = sub.add_parser('list', parents=[common], help='the cells and what each needs')
    s.add_argument('pattern', nargs='?', help='only cells whose id matches (shell pattern or prefix)')
    s.add_argument('--commands', action='store_true', help='also print the commands, with $DATA and $OUT')

    s = sub.add_parser('check', parents=[common], help='verify data and checkpoint of a cell before running it')
    s.add_argument('cell')
    s.add_argument('--data_root', required=True, help='folder the cell\'s paths are relative to')
    s.add_argument('--checkpoint', help='the starting checkpoint (default: DATA_ROOT/checkpoints/<released file>)')
    s.add_argument('--evaluate', action='store_true', help='check for the evaluation-only command')
    s.add_argument('--images', type=_images_arg, default='all', help='all (default), N = a random sample, 0 = none')
    s.add_argument('--seed', type=int, default=0, help='seed of the image sample')
    s.add_argument('--trust_checkpoint', action='store_true',
                   help='read the checkpoint with full unpickling if weights_only=True fails (trusted files only)')
    s.add_argument('--no_progress', action='store_true', help='no progress bar')

    s = sub.add_parser('run', parents=[common], help='run a cell (prints the command first)',
                       epilog='Arguments after -- are passed to every script, e.g. -- --device cpu.')
    s.add_argument('cell')
    s.add_argument('--data_root', required=True)
    s.add_argument('--output_dir', required=True)
    s.add_argument('--checkpoint', help='replaces the first step\'s starting checkpoint')
    s.add_argument('--evaluate', action='store_true', help='evaluate a released (or --checkpoint) fine-tuned file')
    s.add_argument('--torchrun', type=int, default=0, metavar='N', help='run through torchrun --nproc_per_node=N')
    s.add_argument('--dry_run', action='store_true', help='print the commands only')

    s = sub.add_parser('report', parents=[common], help='metrics.json of runs beside the paper numbers')
    s.add_argument('runs', nargs='+', help='output folders (OUT or CELL=OUT)')
    s.add_argument('--markdown', help='also write the table to this file')

    s = sub.add_parser('docs', parents=[common], help='regenerate docs/REPRODUCE.md from the cells file')
    s.add_argument('--out', default=None, help='default docs/REPRODUCE.md')
    s.add_argument('--check', action='store_true', help='exit 1 if the file is not up to date (writes nothing)')

    s = sub.add_parser('plot', help='curves of one or more runs (train_steps.jsonl, log.txt)')
    s.add_argument('runs', nargs='+', help='run output folders')
    s.add_argument('--out', default='run.png', help='PNG file (default run.png)')
    s.add_argument('--labels', nargs='+', help='legend names (default: folder names)')
    s.add_argument('--metrics', nargs='+', help='epoch metrics of log.txt to draw (default: the headline ones)')
    s.add_argument('--columns', type=int, default=3)
    s.add_argument('--dpi', type=int, default=80)
    return p


def cmd_list(args):
    table = load_table(args.cells)
    cells = table.select(args.pattern)
    if not cells:
        raise CellError(f'no cell matches {args.pattern!r}')
    for cell in cells:
        print(f'{cell.id}  [{cell.table}; {cell.pretraining}; family {cell.family}]')
        numbers = ', '.join(f'{m.name} {"—" if m.paper is None else f"{m.paper:g}"}'
                            + (' (server)' if m.server else '') for m in cell.metrics)
        print(f'  paper: {numbers}')
        for mode in ('train', 'evaluate'):
            if mode not in cell.commands:
                continue
            role = cell.steps(mode)[0].checkpoint
            start = {'pretrained': cell.pretrained, 'finetuned': cell.finetuned or '--checkpoint (none released)',
                     'none': 'no checkpoint', 'optional': 'optional --checkpoint'}.get(role, role)
            scripts = ' then '.join(s.script for s in cell.steps(mode))
            print(f'  {mode}: {scripts} from {start}')
        for name in cell.datasets():
            dataset = table.datasets[name]
            files = ', '.join(e['path'] for e in dataset.get('files') or [])
            roots = ', '.join(f'{k} {v}' for k, v in (dataset.get('roots') or {}).items())
            print(f'  data {name}: {files}' + (f'; {roots}' if roots else ''))
        if args.commands:
            from .docs import command_block
            for mode in cell.commands:
                print('  ' + command_block(table, cell, mode).replace('\n', '\n  '))
        print()
    return 0


def cmd_check(args):
    from .check import check_cell, print_result
    table = load_table(args.cells)
    cell = table.cell(args.cell)
    mode = 'evaluate' if args.evaluate else 'train'
    data_root = os.path.abspath(args.data_root)
    result = check_cell(table, cell, data_root, mode, checkpoint=args.checkpoint, images=args.images,
                        seed=args.seed, trust=args.trust_checkpoint, progress=not args.no_progress)
    print_result(cell, mode, data_root, result)
    return 0 if result.ok else 1


def cmd_run(args, extra):
    table = load_table(args.cells)
    cell = table.cell(args.cell)
    mode = 'evaluate' if args.evaluate else 'train'
    data_root, out = os.path.abspath(args.data_root), os.path.abspath(args.output_dir)
    checkpoint = os.path.abspath(args.checkpoint) if args.checkpoint else None
    commands = build_commands(table, cell, mode, data_root, out, checkpoint=checkpoint, torchrun=args.torchrun,
                              python=sys.executable, extra=extra)
    for argv, _ in commands:
        print(shell_line(argv), flush=True)
    if args.dry_run:
        return 0
    os.makedirs(out, exist_ok=True)
    record = {'cell': cell.id, 'family': cell.family, 'mode': mode, 'data_root': data_root,
              'checkpoint': checkpoint or '', 'nproc': args.torchrun or 1,
              'commands': [shell_line(a) for a, _ in commands],
              'started': time.strftime('%Y-%m-%dT%H:%M:%S'), 'returncodes': []}
    record_path = os.path.join(out, 'reproduce.json')

    def save():
        with open(record_path + '.tmp', 'w', encoding='utf-8') as f:
            json.dump(record, f, indent=2)
        os.replace(record_path + '.tmp', record_path)

    save()
    for i, (argv, step_out) in enumerate(commands):
        os.makedirs(step_out, exist_ok=True)
        if len(commands) > 1:
            print(f'== step {i + 1}/{len(commands)}: {os.path.relpath(step_out, out) if step_out != out else "."}',
                  flush=True)
        code = subprocess.call(argv, cwd=REPO_ROOT)
        record['returncodes'].append(code)
        save()
        if code:
            print(f'step {i + 1} failed with exit status {code}: {shell_line(argv)}', file=sys.stderr)
            return code
    record['finished'] = time.strftime('%Y-%m-%dT%H:%M:%S')
    save()
    print(f'done: {out}/metrics.json (python -m reproduce report {out})')
    return 0


def cmd_report(args):
    from .report import collect, markdown
    table = load_table(args.cells)
    text = markdown(collect(table, args.runs))
    print(text)
    if args.markdown:
        with open(args.markdown, 'w', encoding='utf-8') as f:
            f.write(text)
    return 0


def cmd_docs(args):
    from .docs import DOC_PATH, render
    table = load_table(args.cells)
    path = args.out or DOC_PATH
    text = render(table)
    if args.check:
        current = open(path, encoding='utf-8').read() if os.path.isfile(path) else ''
        if current != text:
            print(f'{path} is out of date: run python -m reproduce docs', file=sys.stderr)
            return 1
        print(f'{path} is up to date')
        return 0
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text)
    print(f'wrote {path}')
    return 0


def cmd_plot(args):
    from .plot import plot_runs
    _, drawn = plot_runs(args.runs, args.out, labels=args.labels, epoch_keys=args.metrics, columns=args.columns,
                         dpi=args.dpi)
    print(f'wrote {args.out}: {len(drawn)} curves')
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if '--' in argv:
        cut = argv.index('--')
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    if extra and args.command != 'run':
        print('arguments after -- are only for `run`', file=sys.stderr)
        return 2
    try:
        if args.command == 'run':
            return cmd_run(args, extra)
        return {'list': cmd_list, 'check': cmd_check, 'report': cmd_report, 'docs': cmd_docs,
                'plot': cmd_plot}[args.command](args)
    except CellError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
