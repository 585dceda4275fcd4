"""VQA fine-tuning: train the answer decoder (ALBEF), then rank the answer list for every test question and write
the result file the evaluation server accepts. A model family with its own step and prediction (the registry's
`make_step` / `evaluate` of the 'vqa' task: VLMo's answer classifier, models/vlmo_tasks.py) uses those instead.

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
from models import registry
from models.tokenization import build_tokenizer


def build_loaders(config, tokenizer, args):
    """(seeded train loader or None in --evaluate, its sampler, test loader); the test sampler never pads."""
    splits = create_dataset('vqa', config)
    static = static_shape_options(config)
    train, sampler = None, None
    if not args.evaluate:
        train, sampler = engine.train_loader(splits.train, config, args,
                                             build_collate_fn('vqa', tokenizer, train=True, **static),
                                             config['batch_size_train'])
    world, rank = utils.get_world_size(), utils.get_rank()
    test_sampler = create_sampler([splits.test], [False], world, rank)[0] if args.distributed else None
    test = create_loader([splits.test], [test_sampler], [config['batch_size_test']], [config.get('num_workers', 4)],
                         [False], [build_collate_fn('vqa', tokenizer, train=False, **static)])[0]
    return train, sampler, test


def train_step(model, batch, alpha):
    """One VQA training loss: (image, question, answers, weights, n answers per question)."""
    image, question, answer, weights, n = batch
    return {'loss': model(image, question, answer, alpha=alpha, k=n, weights=weights, train=True)}


def predict_and_save(model, test_loader, tokenizer, config, args, epoch):
    """Rank the answer list for every test question, merge the ranks' results and score them if answers exist."""
    device = engine.device_of(args)
    dataset = test_loader.dataset
    family_evaluate = registry.task_spec(config, 'vqa').evaluate
    with engine.autocast(device, config.get('precision', 'fp32')):
        if family_evaluate is not None:  # the family's own prediction (VLMo: argmax of the answer classifier)
            result = family_evaluate(model, test_loader, tokenizer, device, config)
        else:
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


def last_epoch(config):
    """The configured last epoch (a resumed run that had nothing left to train): `schedular.epochs` - 1, or the step
    schedule's `schedule.epochs` - 1 (0 when only max_steps is given)."""
    block = config.get('schedular') or config.get('schedule') or {}
    return max(int(block.get('epochs') or 1) - 1, 0)


def main(args):
    config = engine.setup(args)
    device = engine.device_of(args)
    tokenizer = build_tokenizer(args.text_encoder)
    train_loader, train_sampler, test_loader = build_loaders(config, tokenizer, args)
    # every BERT weight is overwritten by an ALBEF checkpoint, so bert-base-uncased is read only without one
    decoder = (args.text_decoder or args.text_encoder) if engine.text_weights(args) else None
    model = engine.build_task_model(config, 'vqa', args, text_encoder=engine.text_weights(args),
                                    text_decoder=decoder, tokenizer=tokenizer).to(device)
    epoch = 0
    if not args.evaluate:
        make_step = registry.task_spec(config, 'vqa').make_step  # None: ALBEF's step (the model's own forward)
        step = train_step if make_step is None else make_step(config, device)
        result = engine.fit(args, config, model, train_loader, step, ramp_alpha=config.get('warm_up', True),
                            train_sampler=train_sampler)
        epoch = result.last['epoch'] if result.last else last_epoch(config)
    record = predict_and_save(model, test_loader, tokenizer, config, args, epoch)
    engine.print_json(record)
    engine.write_metrics(args, config, 'vqa', record, epoch=epoch, result_file=record.get('result_file'))
    engine.destroy()


def parser():
    """The official VQA arguments: the common ones plus --evaluate and --text_decoder."""
    p = engine.base_parser('ALBEF VQA fine-tuning', 'configs/VQA.yaml', 'output/vqa')
    p.add_argument('--evaluate', action='store_true', help='only predict the test split from --checkpoint')
    p.add_argument('--text_decoder', default=None,
                   help="BERT weights for the answer decoder when no --checkpoint is given; 'none' = random init "
                        "(default: the text encoder's, bert-base-uncased in the official recipe)")
    return p


if __name__ == '__main__':
    main(parser().parse_args())
