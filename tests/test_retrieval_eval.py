"""Retrieval evaluation: the fast re-ranker equals the reference path, two processes equal one, and Retrieval.py
evaluates a raw released-style file (no momentum, no queues, no 'model' key) and fine-tunes on a tiny dataset."""
import json
import os
import socket
import types

import pytest
import torch
import torch.distributed as dist
from PIL import Image

from evaluation.rerank import (CHUNK_BYTES, MAX_CHUNK, MIN_CHUNK, auto_pair_batch, chunk_size, evaluate_retrieval,
                               extract_features, owned_rows, pair_activation_bytes, pair_chunks, rerank_fast,
                               rerank_reference)
from evaluation.retrieval import text_backbone
from models.checkpoint import load_retrieval_checkpoint
from models.model_retrieval import ALBEF
from tests.helpers import spawn
from tests.parity_utils import StubTokenizer, build_model, load_reference

REF = load_reference('retrieval')
N_IMAGES, N_TEXTS, TEXT_LEN = 9, 27, 30


class IdTokenizer(StubTokenizer):
    """Captions named '0', '1', ... map to fixed random ids of random lengths (padded to 30, as the evaluator asks)."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        lengths = torch.randint(3, 16, (N_TEXTS,), generator=g)
        self.mask = (torch.arange(TEXT_LEN).view(1, -1) < lengths.view(-1, 1)).long()
        ids = torch.randint(104, 1000, (N_TEXTS, TEXT_LEN), generator=g)
        ids[:, 0] = 101
        self.ids = ids * self.mask

    def __call__(self, texts, **kwargs):
        rows = [int(t) for t in texts]
        return types.SimpleNamespace(input_ids=self.ids[rows], attention_mask=self.mask[rows])


class ListLoader(list):
    """A list of (image, index) batches with the re_eval dataset attributes the evaluator reads."""

    def __init__(self, images, batch):
        super().__init__((images[i:i + batch], torch.arange(i, min(i + batch, len(images))))
                         for i in range(0, len(images), batch))
        txt2img = {t: t % len(images) for t in range(N_TEXTS)}
        img2txt = {i: [t for t in range(N_TEXTS) if t % len(images) == i] for i in range(len(images))}
        self.dataset = types.SimpleNamespace(text=[str(t) for t in range(N_TEXTS)], txt2img=txt2img, img2txt=img2txt)


def eval_inputs():
    images = torch.randn(N_IMAGES, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    return ListLoader(images, 4), IdTokenizer()


def test_owned_rows_partition_like_the_official_blocks():
    for n in (1, 5, 10, 27):
        for world in (1, 2, 3, 8):
            blocks = [owned_rows(n, world, r) for r in range(world)]
            assert blocks[0][0] == 0 and blocks[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
            assert all(e - s <= n // world + 1 for s, e in blocks)


# several seconds each; the fast re-ranker stays in test-fast through test_retrieval_parity.py
@pytest.mark.e2e
@pytest.mark.parametrize('pair_batch,trim', [(1, True), (7, False), (10_000, True)])
def test_fast_reranker_equals_reference(pair_batch, trim):
    model = build_model('retrieval', REF).eval()
    loader, tok = eval_inputs()
    feats = extract_features(model, loader, loader.dataset.text, tok, 'cpu')
    sims = feats.image_embeds @ feats.text_embeds.t()
    for k in (3, 9, 40):  # 40 > number of images and of texts: capped
        for score in ('itm', 'itm+itc'):
            ref_i2t, ref_t2i = rerank_reference(model, feats, sims, k, score)
            fast_i2t, fast_t2i = rerank_fast(model, feats, sims, k, score, pair_batch=pair_batch, trim=trim)
            assert torch.allclose(fast_i2t, ref_i2t, atol=1e-5, rtol=1e-5)
            assert torch.allclose(fast_t2i, ref_t2i, atol=1e-5, rtol=1e-5)
            assert torch.equal(fast_i2t == -100, ref_i2t == -100)


@pytest.mark.e2e  # several seconds, like the cases above
def test_automatic_chunks_equal_reference_with_an_itc_hub():
    """Default (automatic) chunking, and smaller chunks that split the hub and pad, on candidates where image 0
    is in every text's top k (the case that made image-order chunks pad badly)."""
    model = build_model('retrieval', REF).eval()
    loader, tok = eval_inputs()
    feats = extract_features(model, loader, loader.dataset.text, tok, 'cpu')
    sims = feats.image_embeds @ feats.text_embeds.t()
    sims[0] += 10.0
    assert chunk_size(model, feats) == auto_pair_batch(pair_activation_bytes(text_backbone(model), TEXT_LEN))
    for k in (3, 9):
        for score in ('itm', 'itm+itc'):
            ref_i2t, ref_t2i = rerank_reference(model, feats, sims, k, score)
            for pair_batch, chunk_bytes in ((None, None), (None, 1), (5, None)):  # automatic, MIN_CHUNK, 5 pairs
                fast_i2t, fast_t2i = rerank_fast(model, feats, sims, k, score, pair_batch=pair_batch,
                                                 chunk_bytes=chunk_bytes)
                assert torch.allclose(fast_i2t, ref_i2t, atol=1e-5, rtol=1e-5)
                assert torch.allclose(fast_t2i, ref_t2i, atol=1e-5, rtol=1e-5)
                assert torch.equal(fast_i2t == -100, ref_i2t == -100)


def test_chunk_size_rule():
    bert = types.SimpleNamespace(config=types.SimpleNamespace(intermediate_size=512, hidden_size=128,
                                                              num_attention_heads=4))
    # widest activation per pair: 30 text rows x max(FFN 512, 4 heads x 30 self-attention scores) fp32 values
    assert pair_activation_bytes(bert, 30) == 30 * 512 * 4
    assert pair_activation_bytes(bert, 30, element_size=2) == 30 * 512 * 2
    assert pair_activation_bytes(bert, 200) == 200 * 4 * 200 * 4
    per_pair = 30 * 512 * 4
    assert auto_pair_batch(per_pair, 'cpu') == CHUNK_BYTES['cpu'] // per_pair
    assert auto_pair_batch(per_pair, 'cuda') == min(MAX_CHUNK, CHUNK_BYTES['cuda'] // per_pair)
    assert auto_pair_batch(per_pair, 'cpu', chunk_bytes=100 * per_pair + 1) == 100
    assert auto_pair_batch(10 ** 12, 'cpu') == MIN_CHUNK and auto_pair_batch(1, 'cpu') == MAX_CHUNK
    feats = types.SimpleNamespace(image_feats=torch.zeros(2, 65, 128), text_feats=torch.zeros(3, 30, 128))
    model = types.SimpleNamespace(text_encoder=bert)
    auto = auto_pair_batch(per_pair, 'cpu')
    assert chunk_size(model, feats) == auto
    assert chunk_size(model, feats, pair_batch=7) == 7  # rerank_batch caps the automatic size ...
    assert chunk_size(model, feats, pair_batch=10 ** 6) == auto  # ... and never raises it


def test_pair_chunks_cover_every_pair_once_with_little_padding():
    # one ITC hub image with 640 candidate pairs among 24 images with 16 and 3 images with 1
    counts = [16] * 10 + [640] + [16] * 14 + [1] * 3
    pair_image = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    for size in (1, 7, 64, 256, 1024, 10 ** 6):
        chunks = pair_chunks(pair_image, size)
        rows = sorted(i for pieces in chunks for s, e in pieces for i in range(s, e))
        assert rows == list(range(pair_image.numel()))
        slots = 0
        for pieces in chunks:
            lengths = [e - s for s, e in pieces]
            assert lengths == sorted(lengths, reverse=True)
            assert all(int(pair_image[s]) == int(pair_image[e - 1]) for s, e in pieces)  # one image per piece
            assert len(pieces) * lengths[0] <= size  # padded query slots within the size
            assert 4 * lengths[-1] >= 3 * lengths[0]  # padding at most a quarter of them
            slots += len(pieces) * lengths[0]
        assert slots <= 1.01 * pair_image.numel()  # image-order chunks of 1,024 pairs padded to 16,003


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _two_process_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    model = build_model('retrieval', REF).eval()
    loader, tok = eval_inputs()
    results = {m: evaluate_retrieval(model, loader, tok, 'cpu', k_test=4, method=m, progress=False)
               for m in ('reference', 'fast')}
    torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    dist.destroy_process_group()


@pytest.mark.e2e
def test_two_process_evaluation_equals_one_process(tmp_path):
    model = build_model('retrieval', REF).eval()
    loader, tok = eval_inputs()
    single = {m: evaluate_retrieval(model, loader, tok, 'cpu', k_test=4, method=m, progress=False)
              for m in ('reference', 'fast')}
    spawn(_two_process_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        results = torch.load(tmp_path / f'rank{rank}.pt', weights_only=False)
        for method, (i2t, t2i) in results.items():
            for ours, one in ((i2t, single[method][0]), (t2i, single[method][1])):
                ours, one = torch.as_tensor(ours), torch.as_tensor(one)
                if method == 'reference':
                    assert torch.equal(ours, one), (rank, method)
                else:
                    # the fast path packs each process's share of the pairs into its own chunks, so its matmuls
                    # have other shapes than in one process; on an Intel Xeon (not on the AMD EPYC this was first
                    # run on) the last bit of some scores then differs. Same candidates, same scores to rounding.
                    assert torch.equal(ours == -100, one == -100), (rank, method)
                    assert torch.allclose(ours, one, rtol=0, atol=1e-5), (rank, method, (ours - one).abs().max())


# ---- Retrieval.py on a tiny hand-made dataset ---------------------------------------------------------------------
def tiny_config(root, **extra):
    """Configs/Retrieval_synthetic.yaml's model at toy size, reading the tiny dataset under `root`."""
    from engine.config import load_config
    config = load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs', 'Retrieval_synthetic.yaml'))
    config.update(train_file=[str(root / 'train.json')], val_file=str(root / 'val.json'),
                  test_file=str(root / 'val.json'), image_root=str(root), image_res=32, batch_size_train=4,
                  batch_size_test=4, num_workers=0, queue_size=8, k_test=3, **extra)
    config['vit'] = dict(config['vit'], depth=1)
    config['bert_config'] = dict(config['bert_config'], num_hidden_layers=2, fusion_layer=1)
    return config


def write_tiny_dataset(root):
    """Six coloured squares with two captions each, in the official re_train / re_eval formats."""
    colours = {'red': (220, 30, 30), 'green': (30, 200, 30), 'blue': (30, 30, 220), 'white': (240, 240, 240),
               'black': (15, 15, 15), 'yellow': (230, 220, 30)}
    train, val = [], []
    for i, (name, rgb) in enumerate(colours.items()):
        Image.new('RGB', (40, 40), rgb).save(root / f'{name}.jpg')
        captions = [f'a {name} square', f'the picture is {name}']
        train += [{'image': f'{name}.jpg', 'caption': c, 'image_id': i} for c in captions]
        val.append({'image': f'{name}.jpg', 'caption': captions})
    (root / 'train.json').write_text(json.dumps(train))
    (root / 'val.json').write_text(json.dumps(val))


def run_retrieval(tmp_path, config, *argv):
    import Retrieval
    from engine.config import save_config
    config_path = tmp_path / 'config.yaml'
    save_config(config, str(config_path))
    args = Retrieval.parser().parse_args(['--config', str(config_path), '--device', 'cpu', '--text_encoder', 'none',
                                          *argv])
    Retrieval.main(args)
    return args


@pytest.mark.e2e
def test_evaluate_a_raw_released_style_file(tmp_path, capsys):
    write_tiny_dataset(tmp_path)
    config = tiny_config(tmp_path)
    raw = ALBEF(config=config, with_momentum=False).state_dict()
    assert not any(k.split('.')[0].endswith('_m') for k in raw) and 'image_queue' not in raw
    torch.save(raw, tmp_path / 'flickr30k.pth')  # raw state dict: no 'model' key, as the released files
    out = tmp_path / 'eval'
    run_retrieval(tmp_path, config, '--checkpoint', str(tmp_path / 'flickr30k.pth'), '--evaluate',
                  '--output_dir', str(out))
    assert 'missing keys: 0 []; unexpected keys: 0 []' in capsys.readouterr().out
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['evaluate_only'] and metrics['rerank_score'] == 'itm' and metrics['k_test'] == 3
    assert set(metrics['val']) == {'txt_r1', 'txt_r5', 'txt_r10', 'txt_r_mean', 'img_r1', 'img_r5', 'img_r10',
                                   'img_r_mean', 'r_mean'}
    logged = json.loads((out / 'log.txt').read_text().splitlines()[0])
    assert logged['epoch'] == 0 and logged['val_r_mean'] == metrics['val']['r_mean']


def test_raw_file_into_the_training_form_copies_momentum_and_resets_queues(tmp_path):
    config = tiny_config(tmp_path)
    raw = ALBEF(config=config, with_momentum=False)
    torch.save(raw.state_dict(), tmp_path / 'raw.pth')
    model = ALBEF(config=config)
    missing, unexpected, _ = load_retrieval_checkpoint(model, str(tmp_path / 'raw.pth'))
    assert not unexpected and all(k.split('.')[0].endswith('_m') or 'queue' in k for k in missing)
    for p, p_m in model._pair_params():
        assert torch.equal(p, p_m)
    assert int(model.queue_ptr) == 0 and bool((model.idx_queue == -100).all())


@pytest.mark.e2e
def test_fine_tune_writes_log_checkpoints_and_metrics(tmp_path):
    write_tiny_dataset(tmp_path)
    config = tiny_config(tmp_path, max_steps_per_epoch=2)
    config['schedular'] = dict(config['schedular'], epochs=2)
    out = tmp_path / 'ft'
    run_retrieval(tmp_path, config, '--output_dir', str(out))
    lines = (out / 'log.txt').read_text().splitlines()
    records = [json.loads(x) for x in lines if x.startswith('{')]
    assert [r['epoch'] for r in records] == [0, 1] and lines[-1].startswith('best epoch:')
    assert all('val_r_mean' in r and 'test_r_mean' in r and 'train_loss_ita' in r for r in records)
    for name in ('checkpoint_best.pth', 'checkpoint_last.pth', 'metrics.json', 'config.yaml'):
        assert (out / name).is_file(), name
    best = max(records, key=lambda r: r['val_r_mean'])
    assert json.loads((out / 'metrics.json').read_text())['epoch'] == best['epoch']
    # the fine-tuned training checkpoint (wrapped, with momentum) evaluates through the inference form
    run_retrieval(tmp_path, config, '--checkpoint', str(out / 'checkpoint_best.pth'), '--evaluate',
                  '--output_dir', str(tmp_path / 'ev'))
    assert json.loads((tmp_path / 'ev' / 'metrics.json').read_text())['val'] == \
        json.loads((out / 'metrics.json').read_text())['val']


def test_queue_size_change_needs_reset_queues_on_finetune(tmp_path):
    from models.checkpoint import CheckpointError
    from tests.parity_utils import model_config
    conv = load_reference('conversions')
    torch.save(conv['inputs']['pretrain_checkpoint'], tmp_path / 'pretrain.pth')
    cfg = dict(model_config(conv['config']['configs']['retrieval']), queue_size=8)
    model = ALBEF(config=cfg)
    with pytest.raises(CheckpointError, match='reset_queues_on_finetune'):
        load_retrieval_checkpoint(model, str(tmp_path / 'pretrain.pth'))
    missing, _, dropped = load_retrieval_checkpoint(model, str(tmp_path / 'pretrain.pth'), reset_queues=True)
    assert set(missing) == {'image_queue', 'text_queue', 'idx_queue', 'queue_ptr'}
    assert model.image_queue.shape == (32, 8) and int(model.queue_ptr) == 0
    assert torch.allclose(model.image_queue.norm(dim=0), torch.ones(8))
