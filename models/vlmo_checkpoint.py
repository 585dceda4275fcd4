"""VLMo checkpoint rules (docs/README_vlmo.md, "Stages and checkpoints"): unwrap, BEiT -> stage 2, text-length
cut, absolute pos_embed and relative-table resampling for a new resolution, NLVR2 modality rows, and the stage-2
freezing rule. ALBEF's rules stay in models/checkpoint.py.
"""
import re

import torch
import torch.nn.functional as F

INDEX_KEYS = ('relative_position_index', 'text_relative_position_index', 'text_imag_relative_position_index')
TEXT_PRETRAIN_TRAINABLE = ('text_embeddings', 'token_type_embeddings', 'mlp_text', 'norm2_text', 'mlm_score',
                           'relative_position_bias_table', 'transformer.norm')
ALBEF_MARKER = 'visual_encoder.blocks.0.mlp.fc1.weight'
BEIT_MARKER = 'blocks.0.mlp.fc1.weight'


def freeze_for_text_pretraining(model):
    """Stage 2: only parameters whose name contains one of TEXT_PRETRAIN_TRAINABLE are trained (official run.py)."""
    for name, p in model.named_parameters():
        p.requires_grad = any(s in name for s in TEXT_PRETRAIN_TRAINABLE)


def unwrap(ckpt):
    """R1: the first of 'state_dict', 'module' (DeepSpeed; 'module.' prefix stripped), 'model', else the file."""
    for key in ('state_dict', 'module', 'model'):
        if isinstance(ckpt, dict) and key in ckpt and isinstance(ckpt[key], dict):
            sd = ckpt[key]
            if key == 'module':
                sd = {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in sd.items()}
            return dict(sd)
    return dict(ckpt)


def convert_beit(sd, table):
    """R2 (stage 2 from BEiT): per-layer attention tables concatenated along the columns in layer order into rows
    [0, T_img) of a copy of `table`; mlp -> mlp_imag, norm2 -> norm2_imag, prefix 'transformer.'."""
    per_layer, out = {}, {}
    for k, v in sd.items():
        if 'relative_position_bias_table' in k:
            per_layer[int(re.search(r'blocks\.(\d+)\.attn\.', k).group(1))] = v
            continue
        k = k.replace('mlp', 'mlp_imag') if 'mlp' in k else k
        k = k.replace('norm2', 'norm2_imag') if 'norm2' in k else k
        out['transformer.' + k] = v
    if per_layer:
        merged = torch.cat([per_layer[i] for i in sorted(per_layer)], dim=1)
        new = table.detach().clone()
        new[:merged.shape[0]] = merged.to(new.dtype)
        out['relative_position_bias_table'] = new
    return out


# ---- R5: relative table resampling ------------------------------------------------------------------------------
def geometric_ratio(src, dst):
    """Bisection on [1.01, 1.5] for q with (1 - q^(src//2)) / (1 - q) ~ dst//2; the last midpoint is kept."""
    left, right, q = 1.01, 1.5, 1.01
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1 - q ** (src // 2)) / (1 - q) > dst // 2:
            right = q
        else:
            left = q
    return q


def source_grid(src, q):
    dis, cur = [], 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return [-d for d in reversed(dis)] + [0.0] + dis


def not_a_knot_matrix(x, u):
    """[len(u), len(x)] float64 matrix E with E @ y = the not-a-knot cubic interpolating spline of (x, y) at u, u
    clamped to [x_0, x_n-1] (the spline scipy's interp2d(kind='cubic') / FITPACK s=0 builds)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    u = torch.as_tensor(u, dtype=torch.float64).clamp(x[0], x[-1])
    n = x.numel()
    h = x[1:] - x[:-1]
    # unknowns: second derivatives M (n); rows: not-a-knot at x_1, interior continuity, not-a-knot at x_n-2
    A = torch.zeros(n, n, dtype=torch.float64)
    R = torch.zeros(n, n, dtype=torch.float64)  # right-hand side as a linear map of y
    A[0, 0], A[0, 1], A[0, 2] = h[1], -(h[0] + h[1]), h[0]
    A[n - 1, n - 3], A[n - 1, n - 2], A[n - 1, n - 1] = h[n - 2], -(h[n - 3] + h[n - 2]), h[n - 3]
    for i in range(1, n - 1):
        A[i, i - 1], A[i, i], A[i, i + 1] = h[i - 1], 2 * (h[i - 1] + h[i]), h[i]
        R[i, i + 1] += 6 / h[i]
        R[i, i] -= 6 / h[i] + 6 / h[i - 1]
        R[i, i - 1] += 6 / h[i - 1]
    Mmap = torch.linalg.solve(A, R)  # M = Mmap @ y
    j = (torch.searchsorted(x, u, right=True) - 1).clamp(0, n - 2)
    xl, xr, hj = x[j], x[j + 1], h[j]
    a, b = (xr - u), (u - xl)
    E = torch.zeros(u.numel(), n, dtype=torch.float64)
    rows = torch.arange(u.numel())
    E += ((a ** 3 / (6 * hj) - a * hj / 6)[:, None] * Mmap[j] + (b ** 3 / (6 * hj) - b * hj / 6)[:, None] * Mmap[j + 1])
    E[rows, j] += a / hj
    E[rows, j + 1] += b / hj
    return E


def resample_relative_table(table, dst_rows, dst_grid):
    """R5: keep the last e = dst_rows - (2G-1)^2 rows, resample the first s^2 rows column by column on the
    geometric source grid with the not-a-knot bicubic spline (float64, cast back)."""
    t = 2 * dst_grid - 1
    extra = dst_rows - t * t
    s2 = table.shape[0] - extra
    s = int(round(s2 ** 0.5))
    if s2 <= 0 or s * s != s2:
        raise ValueError(f'relative_position_bias_table with {table.shape[0]} rows cannot be resampled to '
                         f'{dst_rows} rows: the checkpoint and the model must share max_text_len_of_initckpt')
    q = geometric_ratio(s, t)
    x = source_grid(s, q)
    u = [float(v) for v in range(-(t // 2), t // 2 + 1)]
    E = not_a_knot_matrix(x, u)
    z = table[:s2].double().view(s, s, -1)
    res = torch.einsum('ai,ijc,bj->abc', E, z, E).reshape(t * t, -1).to(table.dtype)
    return torch.cat([res, table[s2:]], dim=0)


def interpolate_pos_embed(pos_embed, num_patches):
    """R4 (Base+): CLS row kept, patch rows bicubic-resized to the new grid (align_corners False)."""
    old = int(round((pos_embed.shape[1] - 1) ** 0.5))
    new = int(round(num_patches ** 0.5))
    if old == new:
        return pos_embed
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    D = pos_embed.shape[-1]
    grid = grid.reshape(1, old, old, D).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new, new), mode='bicubic', align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat([cls, grid], dim=1)


def convert(model, ckpt):
    """Rules R1-R6 applied to a loaded checkpoint object for `model`; returns the state dict to load."""
    sd = unwrap(ckpt)
    if ALBEF_MARKER in sd:
        raise ValueError('this is an ALBEF checkpoint; a VLMo model cannot start from it (model: vlmo needs a BEiT, '
                         'VLMo stage-2/3 or VLMo fine-tuned checkpoint)')
    if model.task == 'textmlm' and BEIT_MARKER in sd:
        sd = convert_beit(sd, model.relative_position_bias_table)
    L = model.max_text_len
    pos = sd.get('text_embeddings.position_embeddings.weight')
    if pos is not None and pos.shape[0] != L:  # R3
        sd['text_embeddings.position_embeddings.weight'] = pos[:L]
        if 'text_embeddings.position_ids' in sd:
            sd['text_embeddings.position_ids'] = sd['text_embeddings.position_ids'][:, :L]
        for k in INDEX_KEYS:
            sd.pop(k, None)
    pe = sd.get('transformer.pos_embed')
    if pe is not None and model.transformer.pos_embed is not None and pe.shape != model.transformer.pos_embed.shape:
        sd['transformer.pos_embed'] = interpolate_pos_embed(pe, model.grid ** 2)  # R4
    table = sd.get('relative_position_bias_table')
    own = model.relative_position_bias_table
    if table is not None and own is not None and table.shape[0] != own.shape[0]:  # R5
        sd['relative_position_bias_table'] = resample_relative_table(table, own.shape[0], model.grid)
        for k in INDEX_KEYS:  # the official loader pops them here; a file without them is accepted (crash fix)
            sd.pop(k, None)
    tt = sd.get('token_type_embeddings.weight')
    n_types = model.token_type_embeddings.weight.shape[0]
    if tt is not None and tt.shape[0] == 2 and n_types == 3:  # R6
        sd['token_type_embeddings.weight'] = torch.cat([tt, tt[1:2]], dim=0)
    return sd


def load_pretrained(model, ckpt):
    """Convert and load non-strictly; returns (missing_keys, unexpected_keys)."""
    result = model.load_state_dict(convert(model, ckpt), strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)
