"""ALBEF VQA fine-tuning: train the answer decoder, then rank the answer list for every test question and write
the result file the evaluation server accepts (spec 6.2, 12.3).

One process:   python VQA.py --config configs/VQA_synthetic.yaml --checkpoint PRETRAINED.pth --output_dir output/vqa
Several GPUs:  torchrun --nproc_per_node=8 VQA.py --config configs/VQA.yaml --checkpoint ALBEF.pth --output_dir output/vqa
Evaluate only: python VQA.py --config configs/VQA.yaml --checkpoint output/vqa/checkpoint_07.pth --evaluate
Results: <output_dir>/result/vqa_result_epoch{E}.json = [{"question_id": int, "answer": str}, ...].
"""
import os

import engine
import utils
from dataset import build_collate_fn, create_dataset, create_loader, create_sampler, static_shape_options
from evaluation.vqa_eval import check_results, dedup_results, ground_truth_answers, predict_answers, score_results
from models.checkpoint import load_vqa_checkpoint
from models.model_vqa import ALBEF
from models.tokenization import build_tokenizer


def build_loaders(config, tokenizer, args):
    """(train loader or None in --evaluate, test loader, train sampler); the test sampler never pads."""
    splits = create_dataset('vqa', config)
    train_set = None if args.evaluate else splits.train
    world, rank = utils.get_world_size(), utils.get_rank()
    samplers = create_sampler([train_set, splits.test], [True, False], world, rank, seed=args.seed) \
        if args.distributed else [None, None]
    workers = config.get('num_workers', 4)
    loaders = create_loader([train_set, splits.test], samplers, [config['batch_size_train'], config['batch_size_test']],
                            [workers, workers], [True, False],
                            [build_collate_fn('vqa', tokenizer, train=True, **static_shape_options(config)),
                             build_collate_fn('vqa', tokenizer, train=False, **static_shape_options(config))],
                            seed=args.seed + rank)
    return loaders[0], loaders[1], samplers[0]


def train_step(model, batch, alpha):
    """One VQA training loss: (image, question, answers, weights, n answers per question)."""
    image, question, answer, weights, n = batch
    return {'loss': model(image, question, answer, alpha=alpha, k=n, weights=weights, train=True)}


def predict_and_save(model, test_loader, tokenizer, config, args, epoch):
    """Rank the answer list for every test question, merge the ranks' results and score them if answers exist."""
    device = engine.device_of(args)
    dataset = test_loader.dataset
    with engine.autocast(device, config.get('precision', 'fp32')):
        result = predict_answers(model, test_loader, dataset.answer_list, tokenizer, device, k=config['k_test'],
                                 eos=config['eos'], show_progress=utils.is_main_process())
    path, merged = engine.save_result(result, os.path.join(args.output_dir, 'result'), f'vqa_result_epoch{epoch}',
                                      merge=dedup_results)
    if not utils.is_main_process():
        return {}
    check_results(merged, [int(a['question_id']) for a in dataset.ann])
    metrics = score_results(merged, ground_truth_answers(dataset.ann))
    record = {'epoch': epoch, 'result_file': path, **{f'test_{k}': round(v, 4) for k, v in metrics.items()}}
    if metrics:
        print(f"local VQA accuracy on {metrics['vqa_scored']} questions with answers: {metrics['vqa_acc']:.2f}")
    utils.append_jsonl(os.path.join(args.output_dir, 'log.txt'), record)
    return record


def main(args):
    config = engine.setup(args)
    device = engine.device_of(args)
    tokenizer = build_tokenizer(args.text_encoder)
    train_loader, test_loader, train_sampler = build_loaders(config, tokenizer, args)

    # every BERT weight is overwritten by an ALBEF checkpoint, so bert-base-uncased is read only without one
    bert = (None, None) if args.checkpoint or args.resume is not None else (args.text_encoder, args.text_decoder)
    model = ALBEF(config=config, text_encoder=bert[0], text_decoder=bert[1], tokenizer=tokenizer)
    if args.checkpoint and args.resume is None:
        load_vqa_checkpoint(model, args.checkpoint)
    model = model.to(device)

    epoch = 0
    if not args.evaluate:
        engine.fit(args, config, model, train_loader, train_step, ramp_alpha=config.get('warm_up', True),
                   train_sampler=train_sampler)
        epoch = int(config['schedular']['epochs']) - 1
    engine.print_json(predict_and_save(model, test_loader, tokenizer, config, args, epoch))
    engine.destroy()


def parser():
    """The official VQA arguments: the common ones plus --evaluate and --text_decoder."""
    p = engine.base_parser('ALBEF VQA fine-tuning', 'configs/VQA.yaml', 'output/vqa')
    p.add_argument('--evaluate', action='store_true', help='only predict the test split from --checkpoint')
    p.add_argument('--text_decoder', default='bert-base-uncased',
                   help="BERT weights for the answer decoder when no --checkpoint is given; 'none' = random init")
    return p


if __name__ == '__main__':
    main(parser().parse_args())
