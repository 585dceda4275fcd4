"""Model families and their task models, chosen by the config key `model` (default 'albef').

A family registers, per task it supports, a `TaskSpec`: the task model's class, how a run starts from a
checkpoint file (`load_checkpoint(model, path, config)`), and optionally the family's own optimiser parameter
groups. The entry scripts ask `task_spec(config, task)` instead of importing a model file. Importing this module
registers the ALBEF family.
"""
from dataclasses import dataclass
from typing import Callable, Optional

CONFIG_KEY = 'model'
DEFAULT_FAMILY = 'albef'
TASKS = ('pretrain', 'retrieval', 'grounding', 'vqa', 'nlvr', 've', 'pretrain_nlvr')

_FAMILIES = {}


@dataclass(frozen=True)
class TaskSpec:
    """One task model of a family.

    model_class: the nn.Module class, built as `model_class(config=config, **kwargs)`.
    load_checkpoint: `(model, path, config) -> whatever the loader reports`; the task's rule for starting from a
        file (pretraining weights converted to the task's layout, or a checkpoint of the task itself).
    optimizer_groups: None (the project's AdamW groups) or `(model, config) -> parameter groups` for a family
        with its own.
    make_step: None (the script's own step) or `(config, device) -> step(model, batch, alpha) -> {name: tensor}` for
        a family whose training step needs more than its model's forward on the batch (SIMLA pretraining: the
        frozen visual tokenizer's MIM targets). Built once per run; what it holds stays out of the state dict.
        Fine-tuning scripts ask it too (VLMo's retrieval, VQA and NLVR2 steps call its compute_* objectives).
    evaluate: None (the script's own protocol, for ALBEF-style models) or the family's replacement, with the task's
        signature: retrieval `(model, loader, tokenizer, device, config) -> (i2t [N_img, N_txt], t2i [N_txt, N_img])`
        score matrices that the script's recall computation reads (VLMo: the dual-encoder scores); vqa
        `(model, loader, tokenizer, device, config) -> [{'question_id': int, 'answer': str}, ...]` for this rank's
        questions (VLMo: argmax of the answer classifier).
    init_checkpoint: None or `config -> path | None`, the file a run starts from when no --checkpoint is given (VLMo's
        `vlmo.init.*` keys); a configured path that does not exist raises, naming the key.
    """
    model_class: type
    load_checkpoint: Callable
    optimizer_groups: Optional[Callable] = None
    make_step: Optional[Callable] = None
    evaluate: Optional[Callable] = None
    init_checkpoint: Optional[Callable] = None

    def build(self, config, **kwargs):
        """`model_class(config=config, **kwargs)` (kwargs: text_encoder, tokenizer, init_deit, ...)."""
        return self.model_class(config=config, **kwargs)


def register_family(name, tasks):
    """Register (or replace) model family `name` with `tasks`, a mapping task name -> TaskSpec."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f'model family {name!r}: unknown tasks {unknown}; the tasks are {list(TASKS)}')
    _FAMILIES[name] = dict(tasks)


def families():
    """The registered family names, sorted."""
    return sorted(_FAMILIES)


def _families_with(task):
    return [name for name in families() if task in _FAMILIES[name]] or ['none registered']


def model_family(config):
    """The config's model family (key `model`, default 'albef'); ValueError for an unregistered one."""
    name = config.get(CONFIG_KEY) or DEFAULT_FAMILY
    if name not in _FAMILIES:
        raise ValueError(f'config key {CONFIG_KEY!r}: unknown model family {name!r}; registered families: '
                         f'{", ".join(families())}')
    return name


def task_spec(config, task):
    """The TaskSpec of `task` in the config's model family; ValueError when the family has no such task."""
    family = model_family(config)
    tasks = _FAMILIES[family]
    if task not in TASKS:
        raise ValueError(f'unknown task {task!r}; the tasks are {", ".join(TASKS)}')
    if task not in tasks:
        raise ValueError(f'model: {family} has no {task!r} task; its tasks are {", ".join(sorted(tasks))} (set the '
                         f'config key {CONFIG_KEY!r} to a family that has it: {", ".join(_families_with(task))})')
    return tasks[task]


def optimizer_groups_for(config, model):
    """The optimiser parameter groups of the config's family for `model` (the first of its TaskSpecs with
    `optimizer_groups` whose model_class `model` is an instance of), or None: the project's AdamW groups. This is
    how the training loop finds a family's groups from the model it is given, without knowing the task."""
    for spec in _FAMILIES[model_family(config)].values():
        if spec.optimizer_groups is not None and isinstance(model, spec.model_class):
            return spec.optimizer_groups(model, config)
    return None


# ---- the ALBEF family ------------------------------------------------------------------------------------------
def _albef_tasks():
    """ALBEF's task models and start-from-a-file rules (models/checkpoint.py), imported here to avoid a cycle."""
    from . import checkpoint as ckpt
    from . import model_nlvr, model_pretrain, model_pretrain_nlvr, model_retrieval, model_ve, model_vqa

    def load_pretrain(model, path, config):
        return ckpt.load_pretrain_checkpoint(model, path)

    def load_retrieval(model, path, config):
        return ckpt.load_retrieval_checkpoint(model, path, reset_queues=config['reset_queues_on_finetune'])

    def load_vqa(model, path, config):
        return ckpt.load_vqa_checkpoint(model, path)

    def load_nlvr(model, path, config):
        return ckpt.load_nlvr_checkpoint(model, path, config['nlvr_momentum_init'])

    def load_ve(model, path, config):
        return ckpt.load_ve_checkpoint(model, path)

    def load_ta(model, path, config):
        return ckpt.load_ta_checkpoint(model, path)

    retrieval = TaskSpec(model_retrieval.ALBEF, load_retrieval)
    return {'pretrain': TaskSpec(model_pretrain.ALBEF, load_pretrain),
            'retrieval': retrieval,
            'grounding': retrieval,
            'vqa': TaskSpec(model_vqa.ALBEF, load_vqa),
            'nlvr': TaskSpec(model_nlvr.ALBEF, load_nlvr),
            've': TaskSpec(model_ve.ALBEF, load_ve),
            'pretrain_nlvr': TaskSpec(model_pretrain_nlvr.ALBEF, load_ta)}


register_family('albef', _albef_tasks())


# ---- the CODIS family (a reconstruction, docs/README_codis.md) ----------------------------------------------------
def _codis_tasks():
    """CODIS pretraining (models/codis.py) and ALBEF's downstream task models, whose start-from-a-file rules first
    drop the CODIS-only keys (the codebook) of a CODIS checkpoint and report them."""
    from . import checkpoint as ckpt
    from . import codis

    def load_pretrain(model, path, config):
        return ckpt.load_pretrain_checkpoint(model, path)

    def dropping_codebook(albef_rule):
        def load(model, path, config):
            sd = ckpt.read_checkpoint(path)  # read once; ALBEF's rule takes the filtered dict in place of the path
            dropped = [k for k in sd if k.split('.', 1)[0] in ('codebook', 'codebook_m')]
            if dropped:
                print(f'dropped CODIS-only keys: {", ".join(dropped)}')
            kept = ckpt.LoadedCheckpoint({k: v for k, v in sd.items() if k not in dropped}, path)
            return albef_rule(model, kept, config)
        return load

    albef = _albef_tasks()
    tasks = {task: TaskSpec(spec.model_class, dropping_codebook(spec.load_checkpoint), spec.optimizer_groups)
             for task, spec in albef.items() if task != 'pretrain'}
    tasks['pretrain'] = TaskSpec(codis.CODIS, load_pretrain)
    return tasks


register_family('codis', _codis_tasks())


# ---- the SIMLA family (docs/README_simla.md) ---------------------------------------------------------------------
def _simla_tasks():
    """SIMLA's task models (models/simla/) and start-from-a-file rules (models/simla/checkpoint.py), each refusing
    an ALBEF checkpoint with a message that says which is which."""
    from .simla import checkpoint as simla_ckpt
    from .simla import nlvr, pretrain, pretrain_nlvr, retrieval, ve, vqa

    def spec(model_class, loader, **hooks):
        return TaskSpec(model_class, simla_ckpt.refusing('simla', loader), **hooks)

    retrieval_spec = spec(retrieval.SIMLA, simla_ckpt.load_retrieval)
    return {'pretrain': spec(pretrain.SIMLA, simla_ckpt.load_pretrain, make_step=pretrain.make_pretrain_step),
            'retrieval': retrieval_spec,
            'grounding': retrieval_spec,
            'vqa': spec(vqa.SIMLA, simla_ckpt.load_vqa),
            'nlvr': spec(nlvr.SIMLA, simla_ckpt.load_nlvr),
            've': spec(ve.SIMLA, simla_ckpt.load_ve),
            'pretrain_nlvr': spec(pretrain_nlvr.SIMLA, simla_ckpt.load_ta)}


def _albef_refusing_simla():
    """The ALBEF family's rules, each first refusing a SIMLA checkpoint (the ALBEF path is otherwise unchanged)."""
    from .simla.checkpoint import refusing
    return {task: TaskSpec(s.model_class, refusing('albef', s.load_checkpoint), s.optimizer_groups, s.make_step,
                           s.evaluate, s.init_checkpoint)
            for task, s in _FAMILIES['albef'].items()}


register_family('simla', _simla_tasks())
register_family('albef', _albef_refusing_simla())


# ---- the VLMo family (models/vlmo.py, docs/README_vlmo.md) ---------------------------------------------------------
def _vlmo_tasks():
    """VLMo's task models; Pretrain.py runs stage 2 (`task: textmlm`) and stage 3. VLMo defines no SNLI-VE, grounding
    or NLVR2 TA-pretraining recipe, so those tasks are not registered and their scripts refuse `model: vlmo`."""
    from optim.vlmo import vlmo_param_groups  # the four groups of VLMo spec section 12.1 (heads at lr_mult_heads)

    from . import vlmo, vlmo_retrieval, vlmo_tasks

    def spec(model_class, **hooks):
        return TaskSpec(model_class, vlmo.load_checkpoint, optimizer_groups=vlmo_param_groups,
                        init_checkpoint=vlmo.init_checkpoint, **hooks)

    return {'pretrain': spec(vlmo.VLMoPretrain),
            'retrieval': spec(vlmo.VLMoRetrieval, make_step=vlmo_retrieval.make_retrieval_step,
                              evaluate=vlmo_retrieval.dual_encoder_scores),
            'vqa': spec(vlmo_tasks.VLMoVQAFinetune, make_step=vlmo_tasks.make_vqa_step,
                        evaluate=vlmo_tasks.evaluate_vqa),
            'nlvr': spec(vlmo_tasks.VLMoNLVRFinetune)}


register_family('vlmo', _vlmo_tasks())
