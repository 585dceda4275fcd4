"""`python -m tests.signal_run {simla,vlmo} --root ROOT --out RESULT.json`: the spec's from-random-init training-signal
run of scripts/simla_signal.py (SIMLA.md 17 item 10) or scripts/vlmo_signal.py (VLMo.md 17.2 item 12), `train_signal`
with its defaults at seed 0, its result written as JSON.

The background runs end with it (tests/simla_runs.py, tests/vlmo_runs.py), so that these 200-step runs of one core
overlap with the other tests instead of adding to them; tests/test_simla_learning.py and tests/test_vlmo_learning.py
assert on the file. The exit status is 0 whenever the run finishes: what it must show is the tests' to judge.
"""
import argparse
import json
import sys

import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('family', choices=('simla', 'vlmo'))
    parser.add_argument('--root', required=True, help='the synthetic world (python -m synthetic.world)')
    parser.add_argument('--out', required=True, help='where to write the result (JSON)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as the tests ran it in their own process (tests/conftest.py)
    if args.family == 'simla':
        from scripts.simla_signal import train_signal
    else:
        from scripts.vlmo_signal import train_signal
    result = train_signal(args.root, seed=args.seed)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)
    print(f'{args.family} training signal, seed {args.seed}: {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
