"""The speed switches of every task model: one preset table (`mode`), applied at construction.

`mode: reference` is the official computation (explicit matmul-softmax attention, per-parameter EMA loop, hard
negatives drawn row by row, unfused AdamW, every fusion pass projecting its own image keys/values); it is also what a
config without `mode` gets. `mode: fast` trades bit-for-bit equality for speed, with the same losses and gradients
within float rounding (docs/PERFORMANCE.md). A key set explicitly in the config (`attention`, `ema`,
`vectorized_negatives`, `kv_reuse`) overrides its preset's value.
"""
from .vit import Block
from .xbert import BertLayer, SharedImageTokens, bert_of, set_attention_impl, set_grad_checkpointing

# 'fused': None = fused AdamW exactly when every parameter is on CUDA; False = the per-parameter AdamW.
SPEED_MODES = {
    'reference': {'attention': 'explicit', 'ema': 'reference', 'vectorized_negatives': False, 'fused': False,
                  'kv_reuse': False},
    'fast': {'attention': 'sdpa', 'ema': 'foreach', 'vectorized_negatives': True, 'fused': None, 'kv_reuse': True},
}
DEFAULT_MODE = 'reference'
OVERRIDABLE = ('attention', 'ema', 'vectorized_negatives', 'kv_reuse')


def resolve_speed_mode(config):
    """The attention/ema/vectorized_negatives/fused/kv_reuse switches: the `mode` preset (default 'reference'),
    overridden by the individual keys the config sets."""
    mode = config.get('mode')
    mode = DEFAULT_MODE if mode is None else mode
    if mode not in SPEED_MODES:
        raise ValueError(f"mode must be one of {sorted(SPEED_MODES)}, got {mode!r}")
    options = dict(SPEED_MODES[mode])
    for key in OVERRIDABLE:
        if config.get(key) is not None:
            options[key] = config[key]
    return options


def apply_speed_options(model, config):
    """Attention and EMA implementation, momentum-teacher mode and activation checkpointing from the config."""
    options = resolve_speed_mode(config)
    set_attention_impl(model, options['attention'])
    model.ema_impl = options['ema']
    model.vectorized_negatives = bool(options['vectorized_negatives'])
    # compiled layers keep plain tensors as inputs (a cache object would only add guards and graph breaks)
    model.kv_reuse = bool(options['kv_reuse']) and not config.get('compile', False)
    model.momentum_eval_mode = bool(config.get('momentum_eval_mode', False))
    model.queue_wraparound = bool(config.get('queue_wraparound', False))
    if config.get('grad_checkpointing', False):
        set_grad_checkpointing(model, True)
    if config.get('compile', False):
        compile_layers(model)


def compile_layers(model):
    """torch.compile every ViT block and BERT layer in place (state-dict keys unchanged); returns how many.

    Layer granularity keeps the EMA update, the all-gather and enqueue, the queue pointer and the multinomial
    sampling outside the compiled regions (data-dependent Python control flow and RNG calls would break the graphs
    or change the draws), and the online and momentum copies share compiled code.
    """
    layers = [m for m in model.modules() if isinstance(m, (Block, BertLayer))]
    for layer in layers:
        layer.compile(dynamic=False)
    return len(layers)


def share_image_tokens(model, image_embeds):
    """`image_embeds` as SharedImageTokens when the model's `kv_reuse` switch is on, otherwise unchanged.

    With it, each fusion layer's cross-attention keys/values are projected once per step and reused by the ITM
    positive pass, the ITM negative pass and (pretraining) the MLM pass, which all read the same image tokens.
    """
    if not getattr(model, 'kv_reuse', False):
        return image_embeds
    return SharedImageTokens(image_embeds).project(bert_of(model.text_encoder))
