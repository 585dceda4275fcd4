"""SIMLA (Khan et al., "Single-Stream Multi-Level Alignment for Vision-Language Pretraining", ECCV 2022) as a model
family of this codebase (docs/README_simla.md).

One task module per task, each with a class `SIMLA(config=..., text_encoder=..., tokenizer=...)` carrying the
release's module names and state-dict layout: `pretrain`, `retrieval` (also grounding), `vqa`, `nlvr`, `ve`,
`pretrain_nlvr`. They are the ALBEF task models (models/model_*.py on models/albef.AlbefBase) with SIMLA's switches:
the shared-stream BERT (models/xbert.py: `shared_text_fusion`, `use_token_type_embeddings`, the image-query pass),
the ViT mask token, ITM/re-rank passes from token ids, and in pretraining the MIM and PSL objectives
(models/losses.py, SIMLA section). `visual_tokenizer` holds the MIM targets' tokenizers.
"""
