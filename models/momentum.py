"""Momentum (EMA) copies and feature queues: the only implementation, shared by every task model.

A task model inherits `MomentumMixin`, lists its (online, momentum) module names in `self.model_pairs`, calls
`self.copy_params()` after building the copies, and, if it keeps queues, `self.init_queues(...)`. The queue
buffers are registered on the model itself so the state-dict keys are the official ones
(`image_queue`, `text_queue`, `idx_queue`, `queue_ptr`).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F


@torch.no_grad()
def concat_all_gather(tensor):
    """All-gather along dim 0 in rank order (no gradient); the identity without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


class MomentumMixin:
    """EMA copies (`model_pairs`) and ITC queues for an nn.Module subclass."""

    model_pairs = ()          # tuple of (online_name, momentum_name)
    momentum = 0.995
    ema_impl = 'reference'    # 'reference': per-parameter loop (official); 'foreach': torch._foreach ops
    queue_wraparound = False
    momentum_eval_mode = False  # official: the teachers follow train() and keep BERT dropout on (docs/QUIRKS.md)

    def train(self, mode=True):
        """nn.Module.train, keeping the momentum modules in eval mode when `momentum_eval_mode` is set."""
        super().train(mode)
        if self.momentum_eval_mode:
            for _, momentum_name in self.model_pairs:
                module = getattr(self, momentum_name, None)
                if module is not None:
                    module.eval()
        return self

    def _pair_params(self):
        for online_name, momentum_name in self.model_pairs:
            online, moment = getattr(self, online_name), getattr(self, momentum_name)
            yield from zip(online.parameters(), moment.parameters())

    @torch.no_grad()
    def copy_params(self):
        """Copy online values into the momentum modules and freeze them."""
        for param, param_m in self._pair_params():
            param_m.data.copy_(param.data)
            param_m.requires_grad = False

    @torch.no_grad()
    def _momentum_update(self):
        """p_m <- m * p_m + (1 - m) * p over parameters only (buffers untouched)."""
        m = self.momentum
        if self.ema_impl == 'foreach':
            pairs = list(self._pair_params())
            online = [p.data.float() if p.dtype != torch.float32 else p.data for p, _ in pairs]
            moment = [pm.data for _, pm in pairs]
            torch._foreach_lerp_(moment, online, 1.0 - m)
            return
        for param, param_m in self._pair_params():
            param_m.data.mul_(m).add_(param.data * (1.0 - m))

    # ---- queues -------------------------------------------------------------------------------------------
    def init_queues(self, embed_dim, queue_size, with_idx=False):
        """Register image/text queues (random unit columns), optional idx queue (-100) and the pointer."""
        self.queue_size = queue_size
        self.register_buffer('image_queue', F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer('text_queue', F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        if with_idx:
            self.register_buffer('idx_queue', torch.full((1, queue_size), -100, dtype=torch.long))
        self.register_buffer('queue_ptr', torch.zeros(1, dtype=torch.long))

    def check_queue_divisible(self, global_batch):
        """Fail early (not mid-training) unless queue_size is a multiple of world_size * batch_size."""
        if self.queue_size % global_batch and not self.queue_wraparound:
            raise ValueError(f'queue_size {self.queue_size} is not divisible by the global batch {global_batch} '
                             f'(world_size x batch_size); change batch_size or queue_size, or set '
                             f'queue_wraparound: true')

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat, text_feat, idx=None):
        """Write the all-gathered momentum features (and idx) at columns [ptr, ptr + G) and advance ptr."""
        image_feats = concat_all_gather(image_feat)
        text_feats = concat_all_gather(text_feat)
        batch_size = image_feats.shape[0]
        self.check_queue_divisible(batch_size)
        ptr = int(self.queue_ptr)
        cols = (torch.arange(batch_size, device=self.image_queue.device) + ptr) % self.queue_size
        self.image_queue[:, cols] = image_feats.T.to(self.image_queue.dtype)
        self.text_queue[:, cols] = text_feats.T.to(self.text_queue.dtype)
        if idx is not None:
            self.idx_queue[:, cols] = concat_all_gather(idx.view(-1, 1)).T
        self.queue_ptr[0] = (ptr + batch_size) % self.queue_size

    @torch.no_grad()
    def reset_queues(self):
        """Random unit queue columns, idx -100, pointer 0 (for fine-tuning from a file without queues)."""
        self.image_queue.copy_(F.normalize(torch.randn_like(self.image_queue), dim=0))
        self.text_queue.copy_(F.normalize(torch.randn_like(self.text_queue), dim=0))
        if hasattr(self, 'idx_queue'):
            self.idx_queue.fill_(-100)
        self.queue_ptr.zero_()
