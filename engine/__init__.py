"""The shared engine every entry script runs on.

- `engine.script`: the entry-script contract (arguments, set-up, training loader, BERT-weights rule, task model
  through the registry, metrics.json).
- `engine.loop`: one training epoch and `fit` (epochs, evaluation, logging, checkpoints).
- `engine.checkpoints`: checkpoint files, what they hold, which are kept, resume.
- `engine.data_position`: each epoch's data order and a resumed epoch's position.
- `engine.config`: the config-key registry, loading with overrides, validation.
- `engine.logging`: the per-step JSON lines, the bar and optional TensorBoard scalars.
"""
from engine.checkpoints import find_latest_checkpoint, resolve_resume  # noqa: F401
from engine.data_position import EpochData  # noqa: F401
from engine.loop import FitResult, alpha_at, autocast, evaluate_only, fit, to_device, train_one_epoch  # noqa: F401
from engine.script import (base_parser, build_task_model, destroy, device_of, eval_metrics, print_json,  # noqa: F401
                           require_task, save_result, setup, text_weights, train_loader, wrap_ddp, write_metrics)
