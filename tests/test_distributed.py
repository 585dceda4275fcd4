"""Two CPU processes (gloo): the queues of every rank hold the momentum features of both ranks, in rank order."""
import os
import socket

import torch
import torch.distributed as dist

from tests.helpers import spawn
from tests.parity_utils import build_model, load_reference, text_input


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _worker(rank, world, port, result_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    ref = load_reference('pretrain')
    model = build_model('pretrain', ref, no_dropout=True).train()
    captured = {}
    enqueue = model._dequeue_and_enqueue

    def spy(image_feat, text_feat, idx=None):
        captured['image'], captured['text'] = image_feat.clone(), text_feat.clone()
        return enqueue(image_feat, text_feat, idx)
    model._dequeue_and_enqueue = spy
    inp = ref['inputs']
    # every rank sees different pictures (shifted and flipped), so their momentum features differ
    image = torch.roll(inp['image'], shifts=rank, dims=0).flip(-1) if rank else inp['image']
    torch.manual_seed(123 + rank)
    model(image, text_input(inp['input_ids'], inp['attention_mask']), alpha=0.4)
    torch.save({'image_feat_m': captured['image'], 'text_feat_m': captured['text'], 'image_queue': model.image_queue,
                'text_queue': model.text_queue, 'ptr': model.queue_ptr}, os.path.join(result_dir, f'rank{rank}.pt'))
    dist.destroy_process_group()


def test_enqueue_gathers_features_of_both_ranks(tmp_path):
    world = 2
    spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world)
    results = [torch.load(tmp_path / f'rank{r}.pt') for r in range(world)]
    B = results[0]['image_feat_m'].shape[0]
    assert not torch.allclose(results[0]['image_feat_m'], results[1]['image_feat_m'])
    for res in results:
        assert int(res['ptr']) == world * B
        for r in range(world):
            cols = slice(r * B, (r + 1) * B)
            assert torch.allclose(res['image_queue'][:, cols], results[r]['image_feat_m'].T)
            assert torch.allclose(res['text_queue'][:, cols], results[r]['text_feat_m'].T)
    assert torch.equal(results[0]['image_queue'], results[1]['image_queue'])
