"""VLMo's ITC and ITM across two CPU processes (gloo), spec VLMo.md §17.2 item 6: each rank's ITC loss equals the
single-process loss on the concatenated batch; the rank-local gradients sum to the single-process gradient (so DDP's
mean is ∇/W), except the logit scales', which every rank has whole (so DDP gives them the full ∇); ITM negatives can
come from the other rank; with `itc.gather_with_grad: true` the gradient is W times larger."""
import os
import socket

import pytest
import torch
import torch.distributed as dist

from models.vlmo import VLMo
from tests.helpers import spawn

WORLD, B, L = 2, 2, 8
ARCH = {'patch_size': 8, 'embed_dim': 32, 'depth': 2, 'num_heads': 2, 'mlp_ratio': 2, 'vlffn_start_layer_index': 1,
        'drop_path_rate': 0.0}
# ITM negatives in the local-first order of each rank: both point at the other rank's pairs
NEG_IMAGE, NEG_TEXT = [2, 3], [3, 2]
SCALES = ('logit_scale', 'logit_vl_scale')


def model(gather_with_grad):
    torch.manual_seed(0)
    cfg = {'model': 'vlmo', 'task': 'pretrain', 'image_res': 16, 'max_text_len': L, 'max_text_len_of_initckpt': L,
           'vlmo': ARCH, 'itc': {'vl_branch': True, 'gather_with_grad': gather_with_grad}}
    m = VLMo(config=cfg, task='pretrain').train()
    with torch.no_grad():  # away from the constant initial tensors (zero table, ITM logits near 0): every output
        for p in m.parameters():  # depends on its inputs
            p.add_(0.1 * torch.randn_like(p))
    return m


def global_batch():
    g = torch.Generator().manual_seed(1)
    n = WORLD * B
    image = torch.randn(n, 3, 16, 16, generator=g)
    ids = torch.zeros(n, L, dtype=torch.long)
    mask = torch.zeros(n, L, dtype=torch.long)
    for i in range(n):
        words = torch.randint(1000, 5000, (2 + i % 3,), generator=g)
        row = torch.cat([torch.tensor([101]), words, torch.tensor([102])])
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return image, ids, mask


def losses_and_grads(m, image, ids, mask, neg_image, neg_text):
    itc = m.compute_itc(image, ids, mask)
    itm = m.compute_itm(image, ids, mask, itc['itc_i2t_logits'], itc['itc_t2i_logits'],
                        torch.tensor(neg_image), torch.tensor(neg_text))
    m.zero_grad(set_to_none=True)
    itc['itc_loss'].backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return itc['itc_loss'].detach(), itm['itm_loss'].detach(), grads


def _port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _worker(rank, port, out, gather_with_grad):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=WORLD)
    image, ids, mask = (t[rank * B:(rank + 1) * B] for t in global_batch())
    itc, itm, grads = losses_and_grads(model(gather_with_grad), image, ids, mask, NEG_IMAGE, NEG_TEXT)
    torch.save({'itc': itc, 'itm': itm, 'grads': grads}, os.path.join(out, f'rank{rank}.pt'))
    dist.destroy_process_group()


def run_two_ranks(tmp_path, gather_with_grad):
    spawn(_worker, args=(_port(), str(tmp_path), gather_with_grad), nprocs=WORLD)
    return [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(WORLD)]


def single_process():
    image, ids, mask = global_batch()
    # rank r's local-first negatives as global indices: rank 0 [2, 3] / [3, 2], rank 1 [0, 1] / [1, 0]
    return losses_and_grads(model(False), image, ids, mask, [2, 3, 0, 1], [3, 2, 1, 0])


@pytest.fixture(scope='module')
def reference():
    return single_process()


def test_itc_and_itm_over_two_ranks_equal_one_process_on_the_whole_batch(tmp_path, reference):
    itc, itm, grads = reference
    ranks = run_two_ranks(tmp_path, gather_with_grad=False)
    for r in ranks:  # every rank computes the loss of the whole (all-gathered, local-first) batch
        assert torch.allclose(r['itc'], itc, rtol=1e-5, atol=1e-6)
    # ITM: each rank's positives and its negatives from the other rank; together the single-process ITM
    assert torch.allclose(sum(r['itm'] for r in ranks) / WORLD, itm, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ranks[0]['itm'], ranks[1]['itm'])
    for name, g in grads.items():  # each rank's gradient flows through its own block only; they add up
        total = sum(r['grads'][name] for r in ranks)
        # the logit scales multiply the whole gathered matrix on every rank: each rank has their full gradient
        # (official: under DDP's mean they learn W times faster than the rest)
        expected = WORLD * g if name in SCALES else g
        assert torch.allclose(total, expected, rtol=1e-4, atol=1e-6), name
    name = 'transformer.patch_embed.proj.weight'
    assert not torch.allclose(ranks[0]['grads'][name], ranks[1]['grads'][name])


def test_gather_with_grad_makes_the_gradient_world_size_times_larger(tmp_path, reference):
    itc, _, grads = reference
    ranks = run_two_ranks(tmp_path, gather_with_grad=True)
    for r in ranks:
        assert torch.allclose(r['itc'], itc, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        total = sum(r['grads'][name] for r in ranks)
        assert torch.allclose(total, WORLD * g, rtol=1e-4, atol=1e-6), name
