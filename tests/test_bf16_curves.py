"""benchmarks/bf16_curves.py: the window verdict, and a short run of the script end to end."""
import sys

import pytest
import torch

from benchmarks import bf16_curves


def noisy_curve(steps, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.tensor([5.0, 4.0, 0.6]) + shift + 0.1 * torch.randn(3, generator=g) for _ in range(steps)]


def test_window_verdict_accepts_noise_and_rejects_a_shift():
    base = noisy_curve(200)
    rows, ok = bf16_curves.window_table((base, noisy_curve(200, seed=1)), window=100, sigmas=3.0)
    assert ok and len(rows) == 2  # two independent noisy curves around the same mean: within noise
    # a shift of 0.1 is 10 standard errors of a 100-step window mean (0.1 / sqrt(100) = 0.01)
    _, ok = bf16_curves.window_table((base, noisy_curve(200, shift=0.1, seed=1)), window=100, sigmas=3.0)
    assert not ok


@pytest.mark.e2e
def test_script_runs_both_precisions_in_lockstep(monkeypatch, capsys):
    monkeypatch.setattr(sys, 'argv', ['bf16_curves.py', '--steps', '4', '--window', '2', '--batch', '4',
                                      '--device', 'cpu'])
    try:
        bf16_curves.main()
    except SystemExit as e:  # exits 1 only when a window is outside noise
        pytest.fail(f'bf16 curves left the noise band in 4 steps: exit {e.code}')
    out = capsys.readouterr().out
    assert out.count('step 2:') == 1 and out.count('step 4:') == 1
    assert 'bf16 vs fp32 over 4 steps on cpu: within noise' in out
