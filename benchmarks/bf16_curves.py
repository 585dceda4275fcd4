"""The bf16 check: the loss curves of bf16 autocast and fp32 agree within noise over the first steps of training.

    python benchmarks/bf16_curves.py                                # 1,000 steps, tiny synthetic model, CPU
    python benchmarks/bf16_curves.py --device cuda --config configs/Pretrain_synthetic.yaml --batch 32

Two copies of the `mode: fast` model start from the same weights and queues and see the same batches, MLM masks and
negative draws (the global RNG is reseeded before each step); one runs in fp32, the other under `precision: bf16`
(bf16 matmuls, fp32 similarities/softmaxes/losses/queues/EMA, engine.autocast). Unlike the fp32 fast-vs-reference
check (benchmarks/loss_equivalence.py) the two runs are not expected to agree step by step: bf16 rounds every matmul
to 8 bits of mantissa and the trajectories drift apart. What must hold is that the curves agree within the noise of
training itself: for each window of `--window` steps, the difference of the two runs' mean losses is compared with
the standard error of the fp32 run's window mean (the step-to-step spread of its losses over sqrt(window)). The
verdict is 'within noise' when every window's difference is under `--sigmas` (default 3) standard errors.
"""
import argparse
import copy
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.loss_equivalence import lockstep_batches  # noqa: E402
from engine import autocast  # noqa: E402
from models.model_pretrain import ALBEF  # noqa: E402
from models.speed import resolve_speed_mode  # noqa: E402
from models.tokenization import build_tokenizer  # noqa: E402
from optim import create_optimizer  # noqa: E402
from engine.config import load_config  # noqa: E402

NAMES = ('mlm', 'ita', 'itm')


def window_table(curves, window, sigmas):
    """Rows (start, fp32 means, bf16 means, differences in standard errors) and whether all are within `sigmas`."""
    fp32, bf16 = (torch.stack(c) for c in curves)
    rows, ok = [], True
    for start in range(0, fp32.shape[0] - window + 1, window):
        a, b = fp32[start:start + window], bf16[start:start + window]
        se = a.std(0) / math.sqrt(window)
        z = (b.mean(0) - a.mean(0)).abs() / se.clamp_min(1e-12)
        ok &= bool((z <= sigmas).all())
        rows.append((start, a.mean(0), b.mean(0), z))
    return rows, ok


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--config', default='configs/Pretrain_synthetic.yaml')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--steps', type=int, default=1000)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--window', type=int, default=100)
    p.add_argument('--sigmas', type=float, default=3.0)
    args = p.parse_args()

    config = load_config(args.config, ['mode=fast', 'init_deit=false'])
    config['batch_size'] = args.batch
    config['queue_size'] = max(args.batch, config['queue_size'] // args.batch * args.batch)
    device = torch.device(args.device)
    tokenizer = build_tokenizer('bert-base-uncased')
    torch.manual_seed(0)
    fp32_model = ALBEF(config=config, text_encoder=None, tokenizer=tokenizer, init_deit=False)
    models = [fp32_model, copy.deepcopy(fp32_model)]
    fused = resolve_speed_mode(config)['fused']
    runs = [(m.to(device).train(), create_optimizer(config['optimizer'], m, fused=fused), precision)
            for m, precision in zip(models, ('fp32', 'bf16'))]
    curves = ([], [])
    for step, image, text in lockstep_batches(config, tokenizer, args.batch, args.steps, device):
        for (model, optimizer, precision), curve in zip(runs, curves):
            torch.manual_seed(1000 + step)
            with autocast(device, precision):
                out = torch.stack(list(model(image, text, alpha=config['alpha']))).float()
            optimizer.zero_grad(set_to_none=True)
            out.sum().backward()
            optimizer.step()
            curve.append(out.detach().cpu())
        if (step + 1) % args.window == 0:
            print(f'step {step + 1}: fp32 ' + ', '.join(f'{n} {v:.4f}' for n, v in zip(NAMES, curves[0][-1])) +
                  ' | bf16 ' + ', '.join(f'{n} {v:.4f}' for n, v in zip(NAMES, curves[1][-1])), flush=True)
    rows, ok = window_table(curves, args.window, args.sigmas)
    print('\n| steps | fp32 mlm / ita / itm | bf16 mlm / ita / itm | |difference| in standard errors |')
    print('|---|---|---|---|')
    for start, a, b, z in rows:
        print(f'| {start}-{start + args.window - 1} | ' + ' / '.join(f'{v:.3f}' for v in a) + ' | ' +
              ' / '.join(f'{v:.3f}' for v in b) + ' | ' + ' / '.join(f'{v:.1f}' for v in z) + ' |')
    verdict = 'within noise' if ok else 'OUTSIDE noise'
    print(f'\nbf16 vs fp32 over {args.steps} steps on {args.device}: {verdict} '
          f'({args.sigmas:g} standard errors per {args.window}-step window)')
    if not ok:
        sys.exit(1)


if __name__ == '__main__':
    main()
