"""What several tests do the same way: write a synthetic world, pretrain a tiny ALBEF on it, run the background
trainings, and run an entry script, in this process, forked, or as a subprocess (plain or under torchrun).

    make_world(root, scale, seed)               synthetic/world.py under root
    pretrain_argv(root, out, deit, **options)   the arguments of a short CPU Pretrain.py run on that world
    run_pretrain(root, out, ...)                that run, in this process; returns out/checkpoint_last.pth
    run_main(script, argv)                      any entry script's main() in this process
    run_script(name, argv) / start_script(...)  a script or module in a subprocess: run to the end / started
    run_forked(name, argv) / start_forked(...)  the same, forked from a process that has imported torch and the
                                                entry scripts once (saves their ~8 s of imports per launch)
    spawn(fn, args, nprocs)                     torch.multiprocessing.spawn, its processes forked the same way
    BackgroundRun(commands, log)                scripts run in the background by a shared pool; wait() joins
    slice_file(source, target, ...)             the first pictures or entries of an annotation file
    read_log(out) / read_steps(out)             a run's log.txt epoch records / train_steps.jsonl lines

The tests give every setting explicitly (seed, world scale, steps, epochs, ...): the learning margins they assert were
measured with exactly those settings.
"""
import contextlib
import importlib
import json
import multiprocessing
import os
import runpy
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_CONFIG = os.path.join(REPO, 'configs', 'Pretrain_synthetic.yaml')
# The DeiT stand-in of the default synthetic world (seed 0, scale 1), committed as test data: `python -m synthetic.deit
# --root <world> --output <this file> --epochs 4` with one thread (tests/fixtures/synthetic_pretrained/README.md).
SYNTHETIC_DEIT = os.path.join(REPO, 'tests', 'fixtures', 'synthetic_pretrained', 'deit_synthetic.pth')


@contextlib.contextmanager
def torch_threads(threads):
    """torch's intra-op thread count set to `threads` inside the block (None: left as it is)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_world(root, scale=1.0, seed=0):
    """The deterministic synthetic world (python -m synthetic.world) written under `root`; returns root as a Path."""
    from synthetic.world import generate
    generate(root, seed=seed, scale=scale)
    return Path(root)


def opts(**keys):
    """`--opt key=value` pairs; dotted keys through a dict: opts(**{'schedular.epochs': 1})."""
    return [arg for key, value in keys.items() for arg in ('--opt', f'{key}={value}')]


def pretrain_argv(root, out, deit=None, *, seed=42, device='cpu', config=PRETRAIN_CONFIG, text_encoder='none',
                  val_file='null', **keys):
    """Pretrain.py's arguments for a run on the synthetic world under `root`, writing to `out`.

    deit: the DeiT stand-in the ViT starts from (deit_checkpoint); None starts from a random ViT (init_deit: false).
    root None leaves train_file and image_root to the other keys (a run on shards). device None leaves --device at
    the script's default. keys: further config keys (--opt, after train_file / image_root / val_file and replacing
    those when named again); dotted keys through a dict: **{'schedular.epochs': 2}.
    """
    argv = ['--config', str(config), '--output_dir', str(out), '--text_encoder', text_encoder, '--seed', str(seed)]
    if device is not None:
        argv += ['--device', device]
    options = {} if root is None else {'train_file': f'[{root}/pretrain.json]', 'image_root': str(root)}
    options['val_file'] = val_file
    options.update({'deit_checkpoint': deit} if deit is not None else {'init_deit': 'false'})
    options.update(keys)
    return argv + opts(**options)


def run_main(script, argv, threads=1):
    """An entry script's main() in this process, one process, no launcher; `script` is the module or its name
    ('Pretrain'). Returns what main returns."""
    module = importlib.import_module(script) if isinstance(script, str) else script
    with torch_threads(threads):
        return module.main(module.parser().parse_args([str(a) for a in argv]))


def run_pretrain(root, out, deit=None, steps=None, epochs=None, threads=1, extra=(), **options):
    """Pretrain.py in this process (pretrain_argv(root, out, deit, **options) + extra); steps and epochs set
    max_steps_per_epoch and schedular.epochs. Returns the path of out/checkpoint_last.pth."""
    if steps is not None:
        options['max_steps_per_epoch'] = steps
    if epochs is not None:
        options['schedular.epochs'] = epochs
    run_main('Pretrain', pretrain_argv(root, out, deit, **options) + list(extra), threads=threads)
    return os.path.join(str(out), 'checkpoint_last.pth')


def script_command(name, argv=(), nproc=None, launcher_args=()):
    """The command line of `name` (a file of the repository, 'Pretrain.py', or a module, 'synthetic.world'), under
    torchrun (python -m torch.distributed.run --standalone) with `nproc` processes when nproc is given."""
    target = [name] if name.endswith('.py') else ['-m', name]
    if nproc is not None:
        target = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', *launcher_args, *target]
    return [sys.executable, *target, *[str(a) for a in argv]]


def script_env(threads=1, env=None):
    """This process's environment plus `env`, with OMP_NUM_THREADS=threads (unless threads is None)."""
    merged = dict(os.environ, **(env or {}))
    if threads is not None:
        merged['OMP_NUM_THREADS'] = str(threads)
    return merged


def run_script(name, argv=(), nproc=None, launcher_args=(), threads=1, env=None, timeout=300, **kwargs):
    """Run `name` (see script_command) in a subprocess from the repository root to its end, output captured as text;
    returns the CompletedProcess (check=True in kwargs raises on a non-zero exit)."""
    return subprocess.run(script_command(name, argv, nproc, launcher_args), cwd=REPO, env=script_env(threads, env),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def start_script(name, argv=(), log=None, nproc=None, launcher_args=(), threads=1, env=None):
    """Start `name` (see script_command) in a subprocess from the repository root, stdout and stderr both into `log`
    (an open file); returns the Popen without waiting."""
    return subprocess.Popen(script_command(name, argv, nproc, launcher_args), cwd=REPO, env=script_env(threads, env),
                            stdout=log, stderr=subprocess.STDOUT)


# ---- launches from a warm fork server ----------------------------------------------------------------------------
# A plain launch of an entry script spends ~8 s of CPU importing torch, torchvision (which imports torch._dynamo),
# transformers and timm before its first step; the suite launches dozens. multiprocessing's fork server imports
# FORK_PRELOAD once and forks every launch from that state: the child then runs the script as __main__ (runpy), so
# it computes exactly what `python Script.py ...` computes (same code, seeds and thread count; checked bit for bit by
# tests/test_forked_launch.py). Tests of process behaviour (torchrun, signals, a fresh interpreter's hash seed) keep
# real subprocesses (run_script / start_script).
FORK_PRELOAD = ['torch', 'torchvision', 'transformers', 'timm', 'engine', 'models', 'dataset', 'Pretrain',
                'Retrieval', 'VQA', 'NLVR', 'VE', 'Grounding', 'Pretrain_nlvr', 'synthetic.beit', 'tests.helpers']
_FORK_CONTEXT = []
_FORK_LOCK = threading.Lock()


def fork_context():
    """The multiprocessing context of the fork server (started on first use, with FORK_PRELOAD imported)."""
    with _FORK_LOCK:
        if not _FORK_CONTEXT:
            context = multiprocessing.get_context('forkserver')
            context.set_forkserver_preload(FORK_PRELOAD)
            _FORK_CONTEXT.append(context)
    return _FORK_CONTEXT[0]


def _forked_main(name, argv, env, threads, stdout_path, stderr_path):
    """The child of start_forked: stdout / stderr into the given files, the environment and thread count of a
    subprocess launch, then `name` run as __main__ from the repository root with `argv`."""
    for fd, path in ((1, stdout_path), (2, stderr_path or stdout_path)):
        target = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.chdir(REPO)
    multiprocessing.set_start_method(None, force=True)  # the platform's default again (the server's child had its own)
    os.environ.clear()
    os.environ.update(env)
    if threads is not None:
        torch.set_num_threads(threads)
    sys.argv = [name, *argv]
    if name.endswith('.py'):
        runpy.run_path(os.path.join(REPO, name), run_name='__main__')
    else:
        sys.modules.pop(name, None)  # imported by the preload: run afresh as __main__, as `python -m` does
        runpy.run_module(name, run_name='__main__', alter_sys=True)


class ForkedProcess:
    """What start_forked returns: the part of subprocess.Popen's interface the tests use (pid, poll, wait,
    send_signal, kill, returncode) over a multiprocessing.Process."""

    def __init__(self, process):
        self.process, self.pid = process, process.pid

    @property
    def returncode(self):
        return self.process.exitcode

    def poll(self):
        return self.process.exitcode

    def wait(self, timeout=None):
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(self.process.name, timeout)
        return self.process.exitcode

    def send_signal(self, sig):
        if self.process.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self):
        self.process.kill()


def start_forked(name, argv=(), log=None, threads=1, env=None, stderr=None):
    """Start `name` (a file of the repository, 'Pretrain.py', or a module, 'synthetic.beit') forked from the fork
    server, its stdout appended to the file `log` (a path) and its stderr to `stderr` (a path; default: `log`);
    returns a ForkedProcess (as subprocess.Popen: poll, wait, kill, returncode)."""
    process = fork_context().Process(target=_forked_main, name=f'forked {name}',
                                     args=(name, [str(a) for a in argv], script_env(threads, env), threads,
                                           str(log), None if stderr is None else str(stderr)))
    process.start()
    return ForkedProcess(process)


def run_forked(name, argv=(), threads=1, env=None, timeout=300):
    """run_script's twin through start_forked: runs `name` to its end and returns a CompletedProcess with its
    return code and its output as text (killed after `timeout` seconds, returncode then negative)."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix='forked_') as tmp:
        out, err = os.path.join(tmp, 'stdout'), os.path.join(tmp, 'stderr')
        open(out, 'w').close()
        open(err, 'w').close()
        process = start_forked(name, argv, out, threads=threads, env=env, stderr=err)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        with open(out, errors='replace') as f_out, open(err, errors='replace') as f_err:
            return subprocess.CompletedProcess([name, *map(str, argv)], code, f_out.read(), f_err.read())


def spawn(fn, args=(), nprocs=2):
    """torch.multiprocessing.spawn(fn, args, nprocs) with the processes forked from the fork server instead of fresh
    interpreters: `fn(rank, *args)` must be a module-level function of an importable module (a test file)."""
    import torch.multiprocessing as mp
    fork_context()  # the server starts with FORK_PRELOAD imported
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method='forkserver')


# ---- background runs: scripts with dependencies, run by a shared pool of worker threads -----------------------------
BACKGROUND_WORKERS = 2  # scripts running at once beside the tests (the CI machine has two cores)


class _Pool:
    """The worker threads that run every BackgroundRun's scripts: a script starts when the scripts it needs have
    ended well and a worker is free; among ready scripts, those that others wait for go first (they open the way
    to more work), then the oldest. One pool per test session, started on first use."""

    def __init__(self, workers):
        self.ready = threading.Condition()
        self.queue = []  # (script, run) waiting for a worker, in submission order
        self.threads = [threading.Thread(target=self._work, name=f'background-worker-{i}', daemon=True)
                        for i in range(workers)]
        for thread in self.threads:
            thread.start()

    def submit(self, run, scripts):
        with self.ready:
            self.queue.extend((script, run) for script in scripts)
            self.ready.notify_all()

    def _next(self):
        """The first runnable script (removing those whose run failed or stopped), or None."""
        runnable = []
        for item in list(self.queue):
            script, run = item
            failed = [other for other in run.after if other.error is not None or other.stopped]
            if failed and run.error is None:
                run.error = f'it needs the background run of {failed[0].log}, which failed'
            if run.error is not None or run.stopped:
                self.queue.remove(item)
                run.skip(script)
            elif all(run.codes.get(i) == 0 for i in script.needs) and all(o.succeeded() for o in run.after):
                runnable.append(item)
        if not runnable:
            return None
        item = min(runnable, key=lambda it: (it[1].priority, not it[0].needed, self.queue.index(it)))
        self.queue.remove(item)
        return item

    def _work(self):
        while True:
            with self.ready:
                item = self._next()
                while item is None:
                    self.ready.wait()
                    item = self._next()
            script, run = item
            run.execute(script)
            self.wake()

    def wake(self):
        with self.ready:
            self.ready.notify_all()


_POOL = []


def background_pool():
    with _FORK_LOCK:
        if not _POOL:
            _POOL.append(_Pool(BACKGROUND_WORKERS))
    return _POOL[0]


class _Script:
    def __init__(self, index, name, argv, needs):
        self.index, self.name, self.argv, self.needs = index, name, [str(a) for a in argv], tuple(needs)
        self.needed = False  # another script of the run needs this one


class BackgroundRun:
    """Scripts run in the background, each forked (start_forked) by the shared pool of BACKGROUND_WORKERS worker
    threads, beside the rest of the suite: a long run the tests read only at the end of the session overlaps with
    the tests before (the machine has two cores and the tests use one thread). `commands` is a list of
    (name, argv) as for script_command, or (name, argv, needs) with `needs` the indices of the earlier commands
    it starts after (default: the one before it); `after`: other BackgroundRuns that must have ended well before
    any of these scripts starts; `priority`: ready scripts of lower values start first (then those that other
    scripts need, then the oldest). Each script's output goes to a file of its own, and wait() writes them, in
    the order of `commands`, to `log` (a `$ command` line before each output, an `# ... exited with` line after
    it). wait() blocks until every script has ended (or was skipped after a failure) and raises AssertionError,
    with the log's tail, if one failed; stop() kills what still runs (the session's clean-up). `pool`: a _Pool of
    its own instead of the session's."""

    def __init__(self, commands, log, threads=1, env=None, after=(), priority=1, pool=None):
        self.log, self.threads, self.env = str(log), threads, env
        self.pool = pool or background_pool()
        self.after, self.priority = list(after), priority
        self.scripts = []
        for index, command in enumerate(commands):
            name, argv, *needs = command
            needs = needs[0] if needs else ([index - 1] if index else [])
            assert all(0 <= i < index for i in needs), f'command {index} needs a later or unknown command: {needs}'
            self.scripts.append(_Script(index, name, argv, needs))
        for script in self.scripts:
            for i in script.needs:
                self.scripts[i].needed = True
        self.codes, self.seconds, self.error, self.stopped = {}, {}, None, False
        self.done = threading.Condition()
        self._procs = {}
        self.pool.submit(self, self.scripts)

    def part(self, script):
        return f'{self.log}.{script.index:02d}'

    def execute(self, script):
        """Run one script to its end (called by a pool worker)."""
        if self.stopped:
            return self.skip(script)
        open(self.part(script), 'w').close()
        started = time.time()
        try:
            proc = start_forked(script.name, script.argv, self.part(script), threads=self.threads, env=self.env)
            with self.done:
                self._procs[script.index] = proc
            code = proc.wait()
        except Exception as exc:  # reported by wait()
            code = f'{type(exc).__name__}: {exc}'
        with self.done:
            self._procs.pop(script.index, None)
            self.codes[script.index], self.seconds[script.index] = code, time.time() - started
            if code != 0 and self.error is None:
                self.error = f'{script.name} exited with {code}'
            self.done.notify_all()

    def succeeded(self):
        return len(self.codes) == len(self.scripts) and all(code == 0 for code in self.codes.values())

    def skip(self, script):
        with self.done:
            self.codes.setdefault(script.index, None)
            self.done.notify_all()

    def _write_log(self):
        with open(self.log, 'w') as log:
            for script in self.scripts:
                if script.index not in self.codes or self.codes[script.index] is None:
                    continue
                log.write(f'$ {" ".join(script_command(script.name, script.argv))}\n')
                with open(self.part(script), errors='replace') as f:
                    log.write(f.read())
                log.write(f'# {script.name} exited with {self.codes[script.index]} after '
                          f'{self.seconds[script.index]:.1f} s\n')

    def wait(self, timeout=3600):
        deadline = time.time() + timeout
        with self.done:
            while len(self.codes) < len(self.scripts):
                left = deadline - time.time()
                if left <= 0:
                    break
                self.done.wait(min(left, 5))
            finished = len(self.codes) == len(self.scripts)
        if not finished:
            self.stop()
            raise AssertionError(f'background run still running after {timeout} s; logs: {self.log}.*')
        self._write_log()
        if self.error is not None:
            with open(self.log, errors='replace') as f:
                tail = f.read()[-4000:]
            raise AssertionError(f'background run failed: {self.error}; last lines of {self.log}:\n{tail}')

    def stop(self):
        with self.done:
            self.stopped = True
            procs = list(self._procs.values())
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.pool.wake()  # its waiting scripts are skipped


def slice_file(source, target, n_images=None, n_items=None):
    """The entries of the first n_images pictures, or the first n_items entries, of a json list; returns target."""
    with open(source) as f:
        items = json.load(f)
    if n_images is not None:
        keep = set(list(dict.fromkeys(item['image'] for item in items))[:n_images])
        items = [item for item in items if item['image'] in keep]
    if n_items is not None:
        items = items[:n_items]
    with open(target, 'w') as f:
        json.dump(items, f)
    return str(target)


def read_log(output_dir):
    """The JSON records of output_dir/log.txt (one per epoch, -1 for the evaluation before training)."""
    with open(os.path.join(output_dir, 'log.txt')) as f:
        return [json.loads(line) for line in f if line.startswith('{')]


def read_steps(output_dir):
    """The lines of output_dir/train_steps.jsonl."""
    with open(os.path.join(output_dir, 'train_steps.jsonl')) as f:
        return [json.loads(line) for line in f]
