"""The embedded synthetic benchmark: a world small enough to check the whole ALBEF recipe on a laptop.

    synthetic.world   the deterministic world of coloured shapes in the official annotation formats
                      (`python -m synthetic.world --root data/synthetic`, or `python -m synthetic --root ...`)
    synthetic.deit    the DeiT stand-in the synthetic pretraining recipe starts from: the tiny ViT trained on the
                      world's attribute labels (`python -m synthetic.deit --root data/synthetic`)

Nothing here is imported by the training code itself; the submodules are loaded only when asked for (synthetic.deit
needs torch, synthetic.world only numpy and Pillow).
"""
