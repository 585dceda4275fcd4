"""VLMo (Bao, Wang, Dong et al., NeurIPS 2022): one Multiway Transformer with shared self-attention and
modality experts (V-FFN, L-FFN, and VL-FFN in the top blocks), used as a dual encoder (ITC, retrieval) and as a
fusion encoder over [text ; image] (ITM, MLM, VQA, NLVR2). Not an ALBEF variant: no cross-attention, no momentum
encoder, no queue.

One class, `VLMo(config=..., task=...)`, builds the task model of `task` in {textmlm, pretrain, retrieval, vqa,
nlvr} with the official module names (state-dict layout of docs/README_vlmo.md, "Key layout"). The methods follow
the API table of docs/README_vlmo.md (infer_image, infer_text, infer, compute_* and load_pretrained); the
objectives are pure functions in models/losses.py (VLMo section), the checkpoint rules in models/vlmo_checkpoint.py.
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import losses
from . import vlmo_checkpoint
from .vlmo_retrieval import retrieval_mode

TASKS = ('textmlm', 'pretrain', 'retrieval', 'vqa', 'nlvr')
ENGINE_TASKS = {'pretrain': 'pretrain', 'retrieval': 'retrieval', 'vqa': 'vqa', 'nlvr': 'nlvr'}
ARCH_DEFAULTS = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, vlffn_start_layer_index=10,
                     layer_scale_init_values=0.1, use_abs_pos_emb=False, use_rel_pos_bias=True, drop_path_rate=0.1,
                     layer_norm_eps=1e-6, qkv_bias=True, init_std=0.02)
IGNORED_KWARGS = ('text_encoder', 'tokenizer', 'init_deit', 'with_momentum', 'text_decoder')


# ---- index maps of the shared relative position table -----------------------------------------------------------
def image_relative_position_index(grid):
    """[1+P, 1+P] BEiT layout: 2-D patch offsets, then CLS row T_img-3, CLS column T_img-2, CLS-CLS T_img-1."""
    axis = torch.arange(grid, device='cpu')
    coords = torch.stack(torch.meshgrid(axis, axis, indexing='ij')).flatten(1)  # [2, P]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (grid - 1)
    num = (2 * grid - 1) ** 2 + 3
    index = torch.zeros(grid * grid + 1, grid * grid + 1, dtype=torch.long, device='cpu')
    index[1:, 1:] = rel[..., 0] * (2 * grid - 1) + rel[..., 1]
    index[0, :] = num - 3
    index[:, 0] = num - 2
    index[0, 0] = num - 1
    return index


def text_relative_position_index(length, length_init, num_image_rows):
    """[L, L]: offset j-i of positions >= 1 at row T_img + L0 + (j-i) (anchored at L0, so stage 2 and stage 3 share
    rows), CLS row/column/corner at T-3, T-2, T-1 with T = T_img + 2*L0 + 2."""
    if length > length_init:
        raise ValueError(f'max_text_len {length} exceeds max_text_len_of_initckpt {length_init}: the relative '
                         f'position table has no rows for such text offsets')
    total = num_image_rows + 2 * length_init + 2
    pos = torch.arange(length, device='cpu')
    index = (pos[None, :] - pos[:, None]) + num_image_rows + length_init
    index[0, :] = total - 3
    index[:, 0] = total - 2
    index[0, 0] = total - 1
    return index


def fused_relative_position_index(text_index, image_index, num_image_rows):
    """[[text map, T_img (text->image)], [T_img+1 (image->text), image map]]."""
    L, n = text_index.shape[0], image_index.shape[0]
    top = torch.cat([text_index, torch.full((L, n), num_image_rows, dtype=torch.long, device='cpu')], 1)
    bottom = torch.cat([torch.full((n, L), num_image_rows + 1, dtype=torch.long, device='cpu'), image_index], 1)
    return torch.cat([top, bottom], 0)


# ---- the Multiway Transformer -----------------------------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth per sample; the identity at rate 0 or in eval mode (draws no random numbers then)."""

    def __init__(self, rate=0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x):
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Shared self-attention: qkv without bias plus [q_bias ; 0 ; v_bias], q scaled by d^-1/2, logits in fp32 plus
    the layer's relative bias, padded keys at -inf (paper section 2; docs/README_vlmo.md "Attention")."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None, relative_position_bias=None):
        B, N, C = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q.float() @ k.float().transpose(-2, -1)
        if relative_position_bias is not None:
            attn = attn + relative_position_bias.unsqueeze(0)
        if mask is not None:
            attn = attn.masked_fill(~mask.bool()[:, None, None, :], float('-inf'))
        attn = attn.softmax(dim=-1).type_as(x)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-LN block: shared attention, then the modality expert(s) chosen by the pass (docs/README_vlmo.md)."""

    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, drop_path, init_values, eps, with_vlffn, max_text_len):
        super().__init__()
        if init_values is not None:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2_text = nn.LayerNorm(dim, eps=eps)
        self.norm2_imag = nn.LayerNorm(dim, eps=eps)
        hidden = int(dim * mlp_ratio)
        self.mlp_text = Mlp(dim, hidden)
        self.mlp_imag = Mlp(dim, hidden)
        self.mlp_vl = Mlp(dim, hidden) if with_vlffn else None
        self.norm2_vl = nn.LayerNorm(dim, eps=eps) if with_vlffn else None
        self.max_text_len = max_text_len

    def _scale(self, gamma, x):
        return x if gamma is None else gamma * x

    def _ffn(self, x, norm, mlp):
        return x + self.drop_path(self._scale(self.gamma_2, mlp(norm(x))))

    def forward(self, x, mask=None, modality_type='vl', relative_position_bias=None):
        x = x + self.drop_path(self._scale(self.gamma_1, self.attn(self.norm1(x), mask, relative_position_bias)))
        if modality_type == 'image':
            return self._ffn(x, self.norm2_imag, self.mlp_imag)
        if modality_type == 'text':
            return self._ffn(x, self.norm2_text, self.mlp_text)
        if self.mlp_vl is not None:
            return self._ffn(x, self.norm2_vl, self.mlp_vl)
        L = self.max_text_len  # the split index is the configured text length, not the mask
        return torch.cat([self._ffn(x[:, :L], self.norm2_text, self.mlp_text),
                          self._ffn(x[:, L:], self.norm2_imag, self.mlp_imag)], dim=1)


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, dim):
        super().__init__()
        self.img_size = img_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f'image of size {tuple(x.shape[-2:])}; this model takes exactly '
                             f'{self.img_size}x{self.img_size} (image_res)')
        return self.proj(x).flatten(2).transpose(1, 2)


class MultiWayTransformer(nn.Module):
    """Patch embedding, cls token, (Base+ absolute pos_embed), the blocks and the final LayerNorm."""

    def __init__(self, img_size, arch, max_text_len, vlffn_start):
        super().__init__()
        D, depth = arch['embed_dim'], arch['depth']
        self.grid = img_size // arch['patch_size']
        self.vlffn_start_layer_index = vlffn_start
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = (nn.Parameter(torch.zeros(1, self.grid ** 2 + 1, D)) if arch['use_abs_pos_emb'] else None)
        self.patch_embed = PatchEmbed(img_size, arch['patch_size'], D)
        rates = torch.linspace(0, arch['drop_path_rate'], depth, device='cpu').tolist()
        self.blocks = nn.ModuleList([
            Block(D, arch['num_heads'], arch['mlp_ratio'], arch['qkv_bias'], rates[i],
                  arch['layer_scale_init_values'], arch['layer_norm_eps'], i >= vlffn_start, max_text_len)
            for i in range(depth)])
        self.norm = nn.LayerNorm(D, eps=arch['layer_norm_eps'])

    def visual_embed(self, image):
        x = self.patch_embed(image)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x, torch.ones(x.shape[:2], dtype=torch.long, device=x.device)


class TextEmbeddings(nn.Module):
    """BERT embeddings with the official layout: word + BERT token-type row 0 (+ absolute positions only with
    use_abs_pos_emb), LayerNorm eps 1e-12, dropout p = drop_path_rate; `position_ids` is a persistent buffer."""

    def __init__(self, vocab_size, dim, max_len, dropout, use_positions):
        super().__init__()
        self.register_buffer('position_ids', torch.arange(max_len, device='cpu').expand(1, -1).clone())
        self.word_embeddings = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_len, dim)
        self.token_type_embeddings = nn.Embedding(2, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-12)
        self.dropout = nn.Dropout(dropout)
        self.use_positions = use_positions

    def forward(self, ids):
        x = self.word_embeddings(ids) + self.token_type_embeddings(torch.zeros_like(ids))
        if self.use_positions:
            x = x + self.position_embeddings(self.position_ids[:, :ids.shape[1]])
        return self.dropout(self.LayerNorm(x))


class Pooler(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, x):
        return torch.tanh(self.dense(x[:, 0]))


class LinearHead(nn.Module):
    """`fc` only (official ITM head and ITC projections)."""

    def __init__(self, dim, out, bias=True):
        super().__init__()
        self.fc = nn.Linear(dim, out, bias=bias)

    def forward(self, x):
        return self.fc(x)


class MLMHead(nn.Module):
    """transform (dense, GELU, LayerNorm 1e-12), untied decoder without bias, plus `bias`."""

    def __init__(self, dim, vocab_size):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(dim, dim)
        self.transform.LayerNorm = nn.LayerNorm(dim, eps=1e-12)
        self.decoder = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, x):
        x = self.transform.LayerNorm(F.gelu(self.transform.dense(x)))
        return self.decoder(x) + self.bias


def classifier(dim_in, hidden, out):
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.LayerNorm(hidden, eps=1e-5), nn.GELU(), nn.Linear(hidden, out))


def gather_local_first(x, with_grad=False):
    """All-gather ordered [local block ; other ranks in rank order]; identity at world size 1. The official gather
    carries no gradient to the other ranks' blocks (the local block keeps its own; docs/README_vlmo.md, ITC);
    `with_grad` (config `itc.gather_with_grad`, not official) sends every rank's gradient back to the block's owner,
    which makes each rank's feature gradient W times the official one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    rank = dist.get_rank()
    if with_grad:
        from torch.distributed.nn.functional import all_gather as all_gather_with_grad
        parts = all_gather_with_grad(x.contiguous())
    else:
        parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.detach().contiguous())
    return torch.cat([x] + [p for r, p in enumerate(parts) if r != rank], dim=0)


def _normalize(x):
    return x / x.norm(dim=-1, keepdim=True)


# ---- the task model -----------------------------------------------------------------------------------------------
class VLMo(nn.Module):
    def __init__(self, config=None, task=None, **kwargs):
        super().__init__()
        unknown = sorted(set(kwargs) - set(IGNORED_KWARGS))
        if unknown:
            raise TypeError(f'VLMo got unexpected arguments {unknown}')
        config = dict(config or {})
        task = task or config.get('task') or 'pretrain'
        if task not in TASKS:
            raise ValueError(f'VLMo has no task {task!r}; the tasks are {", ".join(TASKS)}')
        self.task = task
        arch = {**ARCH_DEFAULTS, **{k: v for k, v in (config.get('vlmo') or {}).items() if k in ARCH_DEFAULTS}}
        self.arch = arch
        D, H, depth = arch['embed_dim'], arch['num_heads'], arch['depth']
        self.num_heads, self.depth = H, depth
        self.image_res = int(config.get('image_res', 224))
        self.max_text_len_of_initckpt = int(config.get('max_text_len_of_initckpt', 196))
        L = int(config.get('max_text_len', 40))
        if task == 'textmlm':
            L = self.max_text_len_of_initckpt  # stage 2 runs at the stage-2 text length
        self.max_text_len = L
        self.vocab_size = int(config.get('vocab_size', 30522))
        weights = config.get('loss_weights') or {}
        self.mlm_weight = float(weights.get('mlm', 0.25))
        self.itc_weight = float(weights.get('itc', 1.0))
        self.itm_weight = float(weights.get('itm', 1.0))
        self.vl_branch = bool((config.get('itc') or {}).get('vl_branch', True))
        # retrieval.mode: dual (official: ITC fine-tuning, dual-encoder scores) or dual_rerank (the supplement's
        # variant: ITC + ITM fine-tuning, dual top-k_test re-ranked by a fused pass; models/vlmo_retrieval.py)
        self.retrieval_mode = retrieval_mode(config) if task == 'retrieval' else None
        self.gather_with_grad = bool((config.get('itc') or {}).get('gather_with_grad', False))
        # stage 2 has no VL expert: the official code forces the start index to the depth for text-only MLM
        vlffn_start = depth if task == 'textmlm' else arch['vlffn_start_layer_index']
        self.grid = self.image_res // arch['patch_size']

        if arch['use_rel_pos_bias']:
            t_img = (2 * self.grid - 1) ** 2 + 3
            self.num_image_rows = t_img
            rows = t_img + 2 * self.max_text_len_of_initckpt + 2
            self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, H * depth))
            self.relative_position_index = image_relative_position_index(self.grid)
            self.text_relative_position_index = text_relative_position_index(L, self.max_text_len_of_initckpt, t_img)
            self.text_imag_relative_position_index = fused_relative_position_index(
                self.text_relative_position_index, self.relative_position_index, t_img)
        else:
            self.relative_position_bias_table = None
            self.relative_position_index = self.text_relative_position_index = None
            self.text_imag_relative_position_index = None
        if task in ('pretrain', 'retrieval'):
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        if task == 'pretrain' and self.vl_branch:
            self.logit_vl_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.transformer = MultiWayTransformer(self.image_res, arch, L, vlffn_start)
        self.text_embeddings = TextEmbeddings(self.vocab_size, D, L, arch['drop_path_rate'], arch['use_abs_pos_emb'])
        self.token_type_embeddings = nn.Embedding(3 if task == 'nlvr' else 2, D)
        self.pooler = Pooler(D)
        if task in ('pretrain', 'textmlm'):
            self.mlm_score = MLMHead(D, self.vocab_size)
        if task == 'pretrain' or self.retrieval_mode == 'dual_rerank':  # the re-ranking variant keeps stage 3's
            self.itm_score = LinearHead(D, 2)
        if task in ('pretrain', 'retrieval'):
            self.itc_text_proj = LinearHead(D, D, bias=False)
            self.itc_image_proj = LinearHead(D, D, bias=False)
        if task == 'pretrain' and self.vl_branch:
            self.itc_vl_text_proj = LinearHead(D, D, bias=False)
            self.itc_vl_image_proj = LinearHead(D, D, bias=False)
        if task == 'vqa':
            self.vqa_classifier = classifier(D, 2 * D, int(config.get('vqa_num_labels', 3129)))
        if task == 'nlvr':
            self.nlvr2_classifier = classifier(2 * D, 2 * D, 2)
        self._init_weights()
        self._text_setup(kwargs.get('tokenizer'), config)
        if task == 'textmlm':
            vlmo_checkpoint.freeze_for_text_pretraining(self)

    # -- initialisation (tensors no checkpoint provides; docs/README_vlmo.md "Initialisation") --
    def _init_weights(self):
        # the Multiway Transformer's trunc-normal std: official 0.02; the synthetic configs scale it with the width
        # (docs/README_vlmo.md, "Synthetic world"); the text embeddings and the heads keep normal(0, 0.02)
        std = self.arch['init_std']

        def init_transformer(m):
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

        def init_head(m):
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.data.normal_(mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.data.zero_()
            if isinstance(m, nn.LayerNorm):
                m.weight.data.fill_(1.0)
                m.bias.data.zero_()

        self.transformer.apply(init_transformer)
        nn.init.trunc_normal_(self.transformer.cls_token, std=std)
        if self.transformer.pos_embed is not None:
            nn.init.trunc_normal_(self.transformer.pos_embed, std=std)
        for name, module in self.named_children():
            if name != 'transformer':
                module.apply(init_head)

    # -- relative bias --
    def _rel_pos_bias(self, index):
        """Per-layer [H, n, n] slices of the shared table gathered by `index` (column = layer*H + head)."""
        if self.relative_position_bias_table is None:
            return [None] * self.depth
        table = self.relative_position_bias_table
        n = index.shape[0]
        bias = table[index.to(table.device).long().view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        H = self.num_heads
        return [bias[i * H:(i + 1) * H] for i in range(self.depth)]

    def _embed_text(self, text_ids):
        return self.text_embeddings(text_ids) + self.token_type_embeddings(torch.zeros_like(text_ids))

    def _embed_image(self, image, token_type_idx=1):
        x, mask = self.transformer.visual_embed(image)
        return x + self.token_type_embeddings(torch.full_like(mask, token_type_idx)), mask

    def _unimodal(self, x, mask, mode, index, proj, vl_proj):
        """All blocks in `mode`; for the pretraining model also the VL branch (blocks >= F in 'vl' mode on the
        output of block F-1). Returns the dict of infer_image / infer_text."""
        biases = self._rel_pos_bias(index)
        hidden = []
        for i, blk in enumerate(self.transformer.blocks):
            x = blk(x, mask=mask, modality_type=mode, relative_position_bias=biases[i])
            hidden.append(x)
        feats = self.transformer.norm(x)
        out = {'feats': feats, 'cls_feats': _normalize(proj(feats[:, 0])) if proj is not None else None,
               'cls_vlffn_feats': None, 'vlffn_feats': None, 'hidden_states': hidden, 'vlffn_hidden_states': None}
        F_ = self.transformer.vlffn_start_layer_index
        if vl_proj is not None and F_ < self.depth:
            y, vl_hidden = hidden[F_ - 1], []
            for i in range(F_, self.depth):
                y = self.transformer.blocks[i](y, mask=mask, modality_type='vl', relative_position_bias=biases[i])
                vl_hidden.append(y)
            vl_feats = self.transformer.norm(y)
            out.update(vlffn_feats=vl_feats, cls_vlffn_feats=_normalize(vl_proj(vl_feats[:, 0])),
                       vlffn_hidden_states=vl_hidden)
        return out

    def _with_vl(self):
        return self.task == 'pretrain' and self.vl_branch

    def infer_image(self, image):
        x, mask = self._embed_image(image, 1)
        out = self._unimodal(x, mask, 'image', self.relative_position_index,
                             getattr(self, 'itc_image_proj', None),
                             self.itc_vl_image_proj if self._with_vl() else None)
        out['image_feats'] = out.pop('feats')
        return out

    def infer_text(self, text_ids, text_masks):
        x = self._embed_text(text_ids)
        out = self._unimodal(x, text_masks, 'text', self.text_relative_position_index,
                             getattr(self, 'itc_text_proj', None),
                             self.itc_vl_text_proj if self._with_vl() else None)
        out['text_feats'] = out.pop('feats')
        return out

    def infer(self, text_ids, text_masks, image, image_token_type_idx=1):
        """Fused pass over [text (type 0) ; image (type t)]; text must be exactly max_text_len long."""
        if text_ids.shape[1] != self.max_text_len:
            raise ValueError(f'fused pass needs texts padded to exactly max_text_len={self.max_text_len} tokens '
                             f'(got {text_ids.shape[1]}): the experts split the sequence at that index')
        t = self._embed_text(text_ids)
        v, v_mask = self._embed_image(image, image_token_type_idx)
        x = torch.cat([t, v], dim=1)
        mask = torch.cat([text_masks.to(v_mask.dtype), v_mask], dim=1)
        biases = self._rel_pos_bias(self.text_imag_relative_position_index) \
            if self.relative_position_bias_table is not None else [None] * self.depth
        hidden = []
        for i, blk in enumerate(self.transformer.blocks):
            x = blk(x, mask=mask, modality_type='vl', relative_position_bias=biases[i])
            hidden.append(x)
        x = self.transformer.norm(x)
        L = text_ids.shape[1]
        return {'text_feats': x[:, :L], 'image_feats': x[:, L:], 'cls_feats': self.pooler(x),
                'hidden_states': hidden}

    # -- objectives --
    def compute_mlm(self, image, text_ids_mlm, text_masks, text_labels_mlm):
        logits = self.mlm_score(self.infer(text_ids_mlm, text_masks, image)['text_feats'])
        return {'mlm_loss': self.mlm_weight * losses.vlmo_mlm_loss(logits, text_labels_mlm), 'mlm_logits': logits}

    def compute_textmlm(self, text_ids_mlm, text_masks, text_labels_mlm):
        logits = self.mlm_score(self.infer_text(text_ids_mlm, text_masks)['text_feats'])
        return {'mlm_loss': losses.vlmo_mlm_loss(logits, text_labels_mlm), 'mlm_logits': logits}

    def compute_itc(self, image, text_ids, text_masks):
        img = self.infer_image(image)
        txt = self.infer_text(text_ids, text_masks)
        g = self.gather_with_grad
        fi, ft = gather_local_first(img['cls_feats'], g), gather_local_first(txt['cls_feats'], g)
        i2t, t2i, main = losses.vlmo_contrastive(fi, ft, self.logit_scale)
        out = {'itc_main_loss': main, 'itc_i2t_logits': i2t, 'itc_t2i_logits': t2i,
               'itc_vl_loss': None, 'itc_vl_i2t_logits': None, 'itc_vl_t2i_logits': None}
        if self._with_vl():
            gi, gt = gather_local_first(img['cls_vlffn_feats'], g), gather_local_first(txt['cls_vlffn_feats'], g)
            vi2t, vt2i, vl = losses.vlmo_contrastive(gi, gt, self.logit_vl_scale)
            out.update(itc_vl_loss=vl, itc_vl_i2t_logits=vi2t, itc_vl_t2i_logits=vt2i)
            out['itc_loss'] = 0.5 * (main + vl)
        else:
            out['itc_loss'] = main
        out['itc_loss'] = self.itc_weight * out['itc_loss']
        return out

    def compute_itm(self, image, text_ids, text_masks, itc_i2t_logits, itc_t2i_logits, neg_image_idx=None,
                    neg_text_idx=None):
        B = image.shape[0]
        all_images = gather_local_first(image.detach())
        all_ids, all_masks = gather_local_first(text_ids), gather_local_first(text_masks)
        with torch.no_grad():
            w_t2i = losses.vlmo_negative_weights(itc_t2i_logits[:B].detach())
            w_i2t = losses.vlmo_negative_weights(itc_i2t_logits[:B].detach())
        if neg_image_idx is None:
            neg_image_idx = losses.sample_negatives(w_t2i)
        if neg_text_idx is None:
            neg_text_idx = losses.sample_negatives(w_i2t)
        neg_image_idx, neg_text_idx = neg_image_idx.to(image.device), neg_text_idx.to(image.device)
        pos = self.infer(text_ids, text_masks, image)['cls_feats']
        neg_img = self.infer(text_ids, text_masks, all_images[neg_image_idx])['cls_feats']
        neg_txt = self.infer(all_ids[neg_text_idx], all_masks[neg_text_idx], image)['cls_feats']
        logits = self.itm_score(torch.cat([pos, neg_img, neg_txt], dim=0))
        labels = losses.vlmo_itm_labels(B, logits.device)
        return {'itm_loss': self.itm_weight * F.cross_entropy(logits.float(), labels), 'itm_logits': logits,
                'itm_labels': labels, 'itm_neg_image_idx': neg_image_idx, 'itm_neg_text_idx': neg_text_idx,
                'itm_weights_t2i': w_t2i, 'itm_weights_i2t': w_i2t}

    def pretrain_losses(self, image, text_ids, text_masks, text_ids_mlm, text_labels_mlm):
        """Official step order: MLM, ITC, ITM (ITM's 2B multinomial draws are the only RNG use at drop rate 0)."""
        mlm = self.compute_mlm(image, text_ids_mlm, text_masks, text_labels_mlm)
        itc = self.compute_itc(image, text_ids, text_masks)
        itm = self.compute_itm(image, text_ids, text_masks, itc['itc_i2t_logits'], itc['itc_t2i_logits'])
        out = {'mlm_loss': mlm['mlm_loss'], 'itc_loss': itc['itc_loss'], 'itm_loss': itm['itm_loss'],
               'itm_neg_image_idx': itm['itm_neg_image_idx'], 'itm_neg_text_idx': itm['itm_neg_text_idx'],
               'itc_main_loss': itc['itc_main_loss'], 'itc_vl_loss': itc['itc_vl_loss']}
        out['loss'] = out['mlm_loss'] + out['itc_loss'] + out['itm_loss']
        return out

    def compute_irtr(self, image, text_ids, text_masks):
        fi = gather_local_first(self.infer_image(image)['cls_feats'], self.gather_with_grad)
        ft = gather_local_first(self.infer_text(text_ids, text_masks)['cls_feats'], self.gather_with_grad)
        i2t, t2i, loss = losses.vlmo_contrastive(fi, ft, self.logit_scale)
        return {'irtr_loss': loss, 'irtr_i2t_logits': i2t, 'irtr_t2i_logits': t2i}

    def compute_vqa(self, image, text_ids, text_masks, vqa_targets):
        logits = self.vqa_classifier(self.infer(text_ids, text_masks, image)['cls_feats'])
        return {'vqa_loss': losses.vlmo_vqa_loss(logits, vqa_targets), 'vqa_logits': logits}

    def compute_nlvr2(self, image0, image1, text_ids, text_masks, labels):
        c1 = self.infer(text_ids, text_masks, image0, image_token_type_idx=1)['cls_feats']
        c2 = self.infer(text_ids, text_masks, image1, image_token_type_idx=2)['cls_feats']
        logits = self.nlvr2_classifier(torch.cat([c1, c2], dim=-1))
        return {'nlvr2_loss': F.cross_entropy(logits.float(), labels.long().view(-1)), 'nlvr2_logits': logits}

    # -- the engine's training step (entry scripts; batches of the shared data pipeline) --
    def _text_setup(self, tokenizer, config):
        """Special ids and the word-piece table the whole-word masking of the training forward needs."""
        get = lambda name, default: int(getattr(tokenizer, name, default))  # noqa: E731
        self.cls_id, self.sep_id = get('cls_token_id', 101), get('sep_token_id', 102)
        self.pad_id = get('pad_token_id', 0)
        self.mask_id, self.unk_id = get('mask_token_id', 103), get('unk_token_id', 100)
        mlm = config.get('mlm') or {}
        self.mlm_masking, self.mlm_probability = mlm.get('masking', 'wwm'), float(mlm.get('probability', 0.15))
        subword = torch.zeros(self.vocab_size, dtype=torch.bool, device='cpu')
        if tokenizer is not None and hasattr(tokenizer, 'convert_ids_to_tokens'):
            tokens = tokenizer.convert_ids_to_tokens(list(range(min(self.vocab_size, len(tokenizer)))))
            subword[:len(tokens)] = torch.tensor([str(t).startswith('##') for t in tokens], device='cpu')
        self.subword = subword

    def fixed_length(self, text):
        """The shared pipeline's `[CLS] pieces` texts as VLMo's `[CLS] pieces [SEP]` padded to max_text_len."""
        return losses.vlmo_fixed_length_text(text.input_ids, text.attention_mask, self.max_text_len, self.sep_id,
                                             self.pad_id)

    def mask_text(self, ids):
        """MLM corruption of fixed-length texts: whole-word masking (official) or per-token (`mlm.masking: token`)."""
        if self.mlm_masking == 'token':
            labels = ids.clone()
            out, labels = losses.mask_tokens(ids.clone(), self.vocab_size, self.mlm_probability, self.pad_id,
                                             self.cls_id, self.mask_id, targets=labels)
            labels[ids == self.sep_id] = -100
            out[(ids == self.sep_id)] = self.sep_id
            return out, labels
        return losses.vlmo_whole_word_mask(ids, self.subword, (self.cls_id, self.sep_id, self.pad_id, self.unk_id,
                                                               self.mask_id), self.mask_id, self.vocab_size,
                                           self.mlm_probability)

    def check_queue_divisible(self, global_batch):
        """VLMo has no queue (the entry script asks every pretraining model)."""
        if global_batch < 2 and self.task == 'pretrain':
            raise ValueError('VLMo ITM hard negatives need a global batch of at least 2 pairs')

    def forward(self, image, text, alpha=0.0, **unused):
        """Pretraining step of Pretrain.py: (loss_mlm, loss_ita, loss_itm) with loss_ita = ITC (the VLMo objectives;
        stage 2 trains MLM only and reports zero ITC/ITM); the retrieval model's step returns its ITC loss, and with
        `retrieval.mode: dual_rerank` (ITC, ITM)."""
        ids, mask = self.fixed_length(text)
        if self.task == 'retrieval':  # Retrieval.py (models/vlmo_retrieval.py): ITC over all-gathered features
            irtr = self.compute_irtr(image, ids, mask)
            if self.retrieval_mode != 'dual_rerank':
                return irtr['irtr_loss']
            # the re-ranking variant also trains ITM, with hard negatives from the retrieval ITC logits
            itm = self.compute_itm(image, ids, mask, irtr['irtr_i2t_logits'], irtr['irtr_t2i_logits'])
            return irtr['irtr_loss'], itm['itm_loss']
        ids_mlm, labels = self.mask_text(ids)
        if self.task == 'textmlm':
            loss = self.compute_textmlm(ids_mlm, mask, labels)['mlm_loss']
            zero = loss.detach() * 0
            return loss, zero, zero
        if self.task != 'pretrain':
            raise NotImplementedError(f'the {self.task} VLMo model trains through compute_* (docs/README_vlmo.md)')
        out = self.pretrain_losses(image, ids, mask, ids_mlm, labels)
        return out['mlm_loss'], out['itc_loss'], out['itm_loss']

    # -- checkpoints --
    def load_pretrained(self, ckpt):
        """Apply the conversion rules (models/vlmo_checkpoint.py) to `ckpt` and load non-strictly;
        returns (missing_keys, unexpected_keys)."""
        return vlmo_checkpoint.load_pretrained(self, ckpt)


class _EngineTask(VLMo):
    """Registry entry (models/registry.py): the task comes from the entry script, not from the config."""
    engine_task = 'pretrain'

    def __init__(self, config=None, **kwargs):
        task = self.engine_task
        if task == 'pretrain' and (config or {}).get('task') == 'textmlm':
            task = 'textmlm'  # stage 2 runs through Pretrain.py with `task: textmlm`
        super().__init__(config=config, task=task, **kwargs)


class VLMoPretrain(_EngineTask):
    engine_task = 'pretrain'


class VLMoRetrieval(_EngineTask):
    engine_task = 'retrieval'


class VLMoVQA(_EngineTask):
    engine_task = 'vqa'


class VLMoNLVR(_EngineTask):
    engine_task = 'nlvr'


def init_checkpoint(config):
    """The start file a VLMo config names in `vlmo.init` (`beit_checkpoint` for stage 2, `stage2_checkpoint` for
    stage 3, `pretrained` for fine-tuning; --checkpoint takes precedence), or None; a named file that does not exist
    raises, naming the key."""
    import os
    named = {k: v for k, v in ((config.get('vlmo') or {}).get('init') or {}).items() if v}
    if len(named) > 1:
        raise ValueError(f'vlmo.init names several start files ({", ".join(sorted(named))}); keep one')
    for key, path in named.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f'vlmo.init.{key}: {path} does not exist; give the local path of the checkpoint '
                                    f'(nothing is downloaded), or set vlmo.init.{key}: null and pass --checkpoint')
        return path
    return None


def load_checkpoint(model, path, config):
    """The registry's start-from-a-file rule: read `path` weights-only and apply the conversion rules."""
    from .checkpoint import load_checkpoint_file
    missing, unexpected = model.load_pretrained(load_checkpoint_file(path))
    print(f'VLMo {model.task} from {path}: {len(missing)} missing keys {missing[:8]}, '
          f'{len(unexpected)} unexpected keys {unexpected[:8]}')
    return missing, unexpected


# the class name shared/tools/keys_check.py builds (the task comes from the config key `task`)
ALBEF = VLMo


def irtr_recall(scores, iids, tiids):
    """Dual-encoder recall (official protocol): TR@k over image rows, IR@k over text columns, fractions."""
    scores = torch.as_tensor(scores).float()
    iids, tiids = torch.as_tensor(iids), torch.as_tensor(tiids)
    out = {}
    for k in (1, 5, 10):
        kk = min(k, scores.shape[1])
        top_t = tiids[scores.topk(kk, dim=1).indices]                    # [NI, k]
        out[f'tr_r{k}'] = (iids.unsqueeze(1) == top_t).float().max(dim=1)[0].mean().item()
        kk = min(k, scores.shape[0])
        top_i = iids[scores.topk(kk, dim=0).indices]                     # [k, NT]
        out[f'ir_r{k}'] = (tiids.unsqueeze(0) == top_i).float().max(dim=0)[0].mean().item()
    return {k: out[k] for k in ('ir_r1', 'ir_r5', 'ir_r10', 'tr_r1', 'tr_r5', 'tr_r10')}
