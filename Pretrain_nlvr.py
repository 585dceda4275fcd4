"""Text-assignment (TA) pretraining for NLVR2: one epoch on image-caption pairs (official issue #115).

Starts from an ALBEF pretraining checkpoint (fusion layers duplicated into the 18-layer pair encoder);
its output_dir/checkpoint_last.pth is the --checkpoint of NLVR.py.
One process:   python Pretrain_nlvr.py --config configs/NLVR_pretrain_synthetic.yaml --text_encoder none \
                   --checkpoint output/pretrain/checkpoint_last.pth --output_dir output/nlvr_ta
Several GPUs:  torchrun --nproc_per_node=8 Pretrain_nlvr.py --config configs/NLVR_pretrain.yaml \
                   --checkpoint ALBEF_4M.pth --output_dir output/NLVR_pretrain
"""
import engine
from engine.tasks import pretrain_loader
from models.tokenization import build_tokenizer


def main(args):
    engine.require_task(args, 'pretrain_nlvr')
    config = engine.setup(args)
    device = engine.device_of(args)
    tokenizer = build_tokenizer(args.text_encoder)

    # the pretraining data, transform and text settings (truncation at 25 tokens)
    loader, sampler = pretrain_loader(config, args, tokenizer)

    # every text weight of the TA model comes from the pretraining checkpoint (layers >= 6 duplicated)
    model = engine.build_task_model(config, 'pretrain_nlvr', args, text_encoder=engine.text_weights(args),
                                    tokenizer=tokenizer).to(device)

    def step(m, batch, alpha):
        image, text = batch
        return {'loss_ta': m(image, text)}

    # vision_proj, text_proj and temp receive no gradient: DDP must tolerate unused parameters
    result = engine.fit(args, config, model, loader, step, ramp_alpha=False, find_unused_parameters=True,
                        train_sampler=sampler)
    last = result.reported or {}
    engine.write_metrics(args, config, 'pretrain_nlvr', last, epoch=last.get('epoch'))
    engine.destroy()


def parser():
    """The common arguments (no evaluation: TA pretraining only trains)."""
    return engine.base_parser('ALBEF text-assignment pretraining for NLVR2', 'configs/NLVR_pretrain.yaml',
                              'output/NLVR_pretrain')


if __name__ == '__main__':
    main(parser().parse_args())
