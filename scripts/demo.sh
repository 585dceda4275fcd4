#!/usr/bin/env bash
# End-to-end CPU demo on the embedded synthetic world: generate the data, train the DeiT stand-in (the paper starts
# from DeiT), pretrain the tiny ALBEF with a progress bar, and print the losses falling and zero-shot retrieval R@1
# before and after. Later steps fine-tune from it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
DATA=data/synthetic
OUT=${DEMO_OUT:-output/demo}
# one core for the model, the rest for the data workers (more threads only thrash on a 2-core machine)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) > 2 ? $(nproc) - 1 : 1 ))}

if [ ! -f "$DATA/manifest.json" ]; then
  echo "== generating the synthetic world under $DATA"
  $PY -m synthetic.world --root "$DATA"
fi

if [ ! -f "$DATA/deit_synthetic.pth" ]; then
  echo "== the DeiT stand-in: supervised attribute classification of the tiny ViT on the training pictures"
  $PY -m synthetic.deit --root "$DATA" --config configs/Pretrain_synthetic.yaml
fi

echo "== pretraining the tiny ALBEF on CPU (configs/Pretrain_synthetic.yaml, ViT initialised from the stand-in)"
$PY Pretrain.py --config configs/Pretrain_synthetic.yaml --output_dir "$OUT/pretrain" --text_encoder none \
  --device cpu --seed 42

# does the pretrained fusion encoder read the picture? ITM and masked words with the right picture against another one
$PY scripts/probe_fusion.py --checkpoint "$OUT/pretrain/checkpoint_last.pth" --root "$DATA"

echo "== VQA: fine-tuning the answer decoder, ranking the answer list, local accuracy (configs/VQA_synthetic.yaml)"
$PY VQA.py --config configs/VQA_synthetic.yaml --checkpoint "$OUT/pretrain/checkpoint_last.pth" \
  --output_dir "$OUT/vqa" --device cpu --seed 42
# image-blind references of the same test questions (docs/README_synthetic.md): the fine-tuned model shown one fixed
# picture for every question (does it read the picture?), the question-kind prior (the most frequent training answer
# of the question's first three words) and always the most common answer
$PY VQA.py --config configs/VQA_synthetic.yaml --checkpoint "$OUT/vqa/checkpoint_last.pth" --evaluate \
  --output_dir "$OUT/vqa_blind" --device cpu --seed 42 --opt image_blind=fixed
$PY scripts/vqa_prior.py --train "$DATA/vqa_train.json" --test "$DATA/vqa_test.json" \
  --model_result "$OUT/vqa/metrics.json" --blind_result "$OUT/vqa_blind/metrics.json"

echo "== retrieval: the pretrained model zero-shot, then fine-tuned (configs/Retrieval_synthetic.yaml), R@1 on test"
$PY Retrieval.py --config configs/Retrieval_synthetic.yaml --checkpoint "$OUT/pretrain/checkpoint_last.pth" \
  --evaluate --output_dir "$OUT/retrieval_zeroshot" --text_encoder none --device cpu --seed 42
$PY Retrieval.py --config configs/Retrieval_synthetic.yaml --checkpoint "$OUT/pretrain/checkpoint_last.pth" \
  --output_dir "$OUT/retrieval" --text_encoder none --device cpu --seed 42
$PY -c "import json, sys; r = [json.load(open(p))['test'] for p in sys.argv[1:3]]; \
print('retrieval test R@1 (txt / img): zero-shot %.1f / %.1f -> fine-tuned %.1f / %.1f; image-blind control: chance %.1f' % \
(r[0]['txt_r1'], r[0]['img_r1'], r[1]['txt_r1'], r[1]['img_r1'], 100.0 / len(json.load(open(sys.argv[3])))))" \
  "$OUT/retrieval_zeroshot/metrics.json" "$OUT/retrieval/metrics.json" "$DATA/retrieval_test.json"
