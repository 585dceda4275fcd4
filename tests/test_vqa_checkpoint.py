"""VQA checkpoint conversion against the official result in tests/fixtures/parity/conversions.pt, and the
loading contract for fine-tuned VQA files (wrapped or raw, with or without momentum keys)."""
import pytest
import torch

from models.checkpoint import convert_to_vqa, load_vqa_checkpoint, pretrain_to_vqa
from models.model_vqa import ALBEF
from tests.parity_utils import StubTokenizer, load_reference, model_config

REF = load_reference('conversions')
RESULT = REF['outputs']['results']['vqa']
PRETRAIN_SD = REF['inputs']['pretrain_checkpoint']['model']


def build(distill=True):
    torch.manual_seed(0)
    cfg = model_config(REF['config']['configs']['vqa'])
    cfg['distill'] = distill
    return ALBEF(config=cfg, tokenizer=StubTokenizer())


@pytest.fixture(scope='module')
def converted():
    model = build()
    missing, unexpected = model.load_state_dict(convert_to_vqa(PRETRAIN_SD, model), strict=False)
    return model, missing, unexpected


def test_pretrain_to_vqa_matches_official_load_outcome(converted):
    model, missing, unexpected = converted
    assert set(missing) == set(RESULT['missing_keys']) == set()
    assert set(unexpected) == set(RESULT['unexpected_keys'])
    assert len(unexpected) == 14


def test_pretrain_to_vqa_matches_official_tensors(converted):
    model, _, _ = converted
    sd = model.state_dict()
    assert list(sd) == list(RESULT['state_dict_keys'])
    assert {k: list(v.shape) for k, v in sd.items()} == {k: list(v) for k, v in RESULT['state_dict_shapes'].items()}
    for key, expected in RESULT['state_dict'].items():
        if key.endswith('pos_embed'):
            assert torch.allclose(sd[key], expected, atol=1e-6), key
        else:
            assert torch.equal(sd[key], expected), key


def test_decoder_layers_come_from_the_fusion_layers(converted):
    model, _, _ = converted
    sd = model.state_dict()
    for n in range(6):
        for online in ('', '_m'):
            src = f'text_encoder{online}.bert.encoder.layer.{n + 6}.crossattention.self.key.weight'
            assert torch.equal(sd[f'text_decoder{online}.bert.encoder.layer.{n}.crossattention.self.key.weight'],
                               PRETRAIN_SD[src])
    assert torch.equal(sd['text_encoder.encoder.layer.2.attention.self.query.weight'],
                       PRETRAIN_SD['text_encoder.bert.encoder.layer.2.attention.self.query.weight'])
    assert torch.equal(sd['text_decoder.cls.predictions.transform.dense.weight'],
                       PRETRAIN_SD['text_encoder.cls.predictions.transform.dense.weight'])


def test_rule_follows_the_fusion_layer():
    sd = {'text_encoder.bert.encoder.layer.1.output.dense.weight': torch.zeros(1),
          'text_encoder.bert.encoder.layer.3.output.dense.weight': torch.ones(1),
          'text_encoder.bert.embeddings.LayerNorm.weight': torch.ones(2)}
    out = pretrain_to_vqa(dict(sd), fusion_layer=3)
    assert set(out) == {'text_encoder.encoder.layer.1.output.dense.weight',
                        'text_encoder.encoder.layer.3.output.dense.weight',
                        'text_encoder.embeddings.LayerNorm.weight',
                        'text_decoder.bert.encoder.layer.0.output.dense.weight',
                        'text_decoder.bert.embeddings.LayerNorm.weight'}


def test_load_from_files_wrapped_raw_and_without_momentum(tmp_path, converted, capsys):
    trained, _, _ = converted
    wrapped = tmp_path / 'pretrain.pth'
    torch.save({'model': PRETRAIN_SD}, wrapped)
    model = build()
    missing, unexpected = load_vqa_checkpoint(model, str(wrapped))
    assert missing == [] and set(unexpected) == set(RESULT['unexpected_keys'])
    printed = capsys.readouterr().out
    assert printed.count('reshape position embedding from 4 to 9') == 2 and 'load checkpoint from' in printed

    full = {k: v.clone() for k, v in trained.state_dict().items()}
    raw = tmp_path / 'vqa_raw.pth'
    torch.save(full, raw)
    assert load_vqa_checkpoint(build(), str(raw)) == ([], [])
    torch.save({'model': full, 'epoch': 3}, tmp_path / 'vqa_wrapped.pth')
    assert load_vqa_checkpoint(build(), str(tmp_path / 'vqa_wrapped.pth')) == ([], [])

    online_only = {k: v for k, v in full.items() if '_m.' not in k}
    torch.save(online_only, tmp_path / 'vqa_online.pth')
    assert load_vqa_checkpoint(build(distill=False), str(tmp_path / 'vqa_online.pth')) == ([], [])
    assert load_vqa_checkpoint(build(distill=False), str(raw)) == ([], [])  # momentum keys dropped
    model = build()
    missing, unexpected = load_vqa_checkpoint(model, str(tmp_path / 'vqa_online.pth'))
    assert missing and all('_m.' in k for k in missing) and unexpected == []
    assert torch.equal(model.text_decoder_m.bert.encoder.layer[0].crossattention.self.key.weight,
                       model.text_decoder.bert.encoder.layer[0].crossattention.self.key.weight)
