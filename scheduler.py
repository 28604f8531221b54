"""Run a list of jobs as subprocesses, a few at a time, on CPU or GPU slots.

Each job's output is appended to its log after a header naming the attempt, so that a log is
never truncated (a resumed run keeps its first epochs; a second sweep refused by a run's lock
never clobbers the live log). After each job, one progress line: how many are done, running,
waiting and failed, and an estimate of the time left from the jobs finished so far. Ctrl-C or
SIGTERM stops the running jobs (they save their resume states) and marks the rest not started.
A job that another process already runs (its script refused it with common.RUNNING_ELSEWHERE)
is "running elsewhere", not a failure.

reproduce.py builds the jobs (its Run extends Job); this module knows nothing of figures.
"""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import common

EXIT_OK, EXIT_USAGE, EXIT_DIVERGED = 0, 2, 3
POLL_SECONDS = 0.2  # how often the scheduler checks its running subprocesses
TERMINATE_GRACE_SECONDS = 10  # on Ctrl-C, wait this long before SIGKILL


@dataclass
class Job:
    """One subprocess: its command, its log and the files it must leave (relative to the root
    folder it runs in), and what became of it."""
    name: str
    script: str         # absolute path of the script run with this Python
    args: list          # arguments after the script path
    pickles: list       # the results files a successful job leaves
    log: str
    status: str = 'pending'
    returncode: object = None
    seconds: object = None
    extra: dict = field(default_factory=dict)

    def command(self):
        return [sys.executable, self.script] + self.args


def clock(seconds):
    return time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(seconds))



def write_manifest(path, header: dict, jobs, argv, cwd, started, finished=None):
    """Record an invocation (its command line, working folder, code version and each job's
    command and outcome) in the JSON file `path`, after the earlier invocations."""
    import protocol
    try:
        with open(path) as stream:
            history = json.load(stream).get('invocations', [])
    except (OSError, ValueError, AttributeError):
        history = []
    history = [entry for entry in history if isinstance(entry, dict)
               and entry.get('started_unix') != started]  # this invocation's is replaced
    invocation = {
        'started_unix': started, 'started': clock(started), 'finished': clock(finished) if finished else None,
        'argv': list(argv), 'cwd': cwd, 'code_version': protocol.code_version(),
        'runs': [{'name': job.name, 'command': job.command(), 'status': job.status,
                  'returncode': job.returncode, 'seconds': job.seconds,
                  'pickles': job.pickles, 'log': job.log, **job.extra} for job in jobs],
    }
    common.atomic_write(path, lambda stream: (json.dump(
        {**header, 'invocations': history + [invocation]}, stream, indent=1), stream.write('\n')), binary=False)


def folder_problems(folder, flag):
    """A folder that is a file, lies under a file, or cannot be written: named before any job."""
    path = os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        return [f'{flag} {folder}: {path} is not a folder']
    return [] if common.can_write_in(path) else [f'{flag} {folder}: {path} is not writable']


def gpu_problems(gpus):
    """GPU ids that this machine does not have."""
    try:
        import torch
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # no torch, or a broken CUDA install
        available = 0
    if max(int(gpu) for gpu in gpus) >= available:
        return [f'--gpus {",".join(gpus)}: this machine has {available} CUDA device(s)']
    return []


def make_slots(args):
    """One entry per concurrent run: a GPU id (str) or None for CPU."""
    if args.gpus:
        return [gpu for gpu in args.gpus for _ in range(args.per_gpu)]
    return [None] * args.jobs


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def child_env(gpu, cpu_slots: int) -> dict:
    """The environment of one run: unbuffered output (live logs), its GPU, and, when several runs
    share the CPU, an equal share of its cores as OMP_NUM_THREADS. Left to itself, each run
    starts one thread per core; with two runs on two cores the threads spin against each other,
    and the synthetic sweep's small runs took five times as long. A user's own OMP_NUM_THREADS
    is kept."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    if gpu is not None:
        env['CUDA_VISIBLE_DEVICES'] = gpu
    elif cpu_slots > 1 and 'OMP_NUM_THREADS' not in os.environ:
        env['OMP_NUM_THREADS'] = str(max(1, usable_cpus() // cpu_slots))
    return env


def _launch(run, root, gpu, cpu_slots=1):
    """Start the run, its output appended to its log after a header naming the attempt (a log is
    never truncated: a resumed run keeps its first epochs, and a refused second sweep never
    clobbers a live log)."""
    log_path = os.path.join(root, run.log)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = child_env(gpu, cpu_slots)
    shown = [f'{name}={env[name]}' for name in ('CUDA_VISIBLE_DEVICES', 'OMP_NUM_THREADS')
             if name in env and env[name] != os.environ.get(name)]
    log = open(log_path, 'a')
    log.write(f'# ---- attempt started {clock(time.time())}, pid {os.getpid()} of reproduce.py\n'
              f'# cwd: {root}\n' + ''.join(f'# {setting}\n' for setting in shown)
              + '# ' + shlex.join(run.command()) + '\n')
    log.flush()
    try:
        process = subprocess.Popen(run.command(), cwd=root, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    except BaseException:
        log.close()
        raise
    return process, log


def last_line(path):
    """The last non-empty line of a log (its error, for a run that failed)."""
    try:
        with open(path, 'rb') as stream:
            stream.seek(0, os.SEEK_END)
            stream.seek(max(0, stream.tell() - 4096))
            lines = [line for line in stream.read().decode(errors='replace').splitlines()
                     if line.strip() and not line.startswith('# ')]
    except OSError:
        return ''
    return lines[-1].strip()[:300] if lines else ''


def _finish(run, returncode, root, started):
    run.returncode = returncode
    run.seconds = round(time.time() - started, 2)
    has_pickle = all(os.path.exists(os.path.join(root, path)) for path in run.pickles)
    reason = last_line(os.path.join(root, run.log))
    if returncode == EXIT_OK and has_pickle:
        run.status = 'done'
    elif returncode == EXIT_DIVERGED and has_pickle:
        run.status = 'diverged'  # finished; its curves stop early
    elif returncode == EXIT_USAGE and common.RUNNING_ELSEWHERE in reason:
        run.status = 'running elsewhere'  # another sweep holds it: not this sweep's failure
    else:
        run.status = 'failed'
        run.extra['reason'] = (f'exit {returncode} but a pickle is missing: {", ".join(run.pickles)}'
                               if returncode in (EXIT_OK, EXIT_DIVERGED) else reason or f'exit {returncode}')


def progress_line(runs, slots, started):
    """Counts of the sweep's runs and an estimate of the time left from those finished."""
    count = {status: sum(run.status == status for run in runs) for status in
             ('done', 'diverged', 'running', 'pending', 'failed', 'running elsewhere')}
    finished = [run.seconds for run in runs if run.status in ('done', 'diverged')]
    left = count['running'] + count['pending']
    text = (f'progress: {count["done"] + count["diverged"]} done, {count["running"]} running, '
            f'{count["pending"]} waiting, {count["failed"]} failed'
            + (f', {count["running elsewhere"]} running elsewhere' if count['running elsewhere'] else '')
            + f' of {len(runs)}; {_duration(time.time() - started)} so far')
    if finished and left:
        estimate = sum(finished) / len(finished) * left / max(1, min(len(slots), left))
        text += f', about {_duration(estimate)} left'
    return text


def _duration(seconds):
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f'{hours} h {rest // 60:02d} min' if hours else f'{rest // 60} min {rest % 60:02d} s'


def run_all(runs, root, slots):
    """Run ``runs`` with at most len(slots) at once; return True if interrupted.

    Each run gets the first free slot (a GPU id or None for CPU). A failed run does not stop
    the others.
    """
    pending = list(runs)
    running = {}  # slot index -> (run, process, log file, start time)
    total, launched, sweep_started = len(runs), 0, time.time()
    try:
        while pending or running:
            for slot, gpu in enumerate(slots):
                if slot in running or not pending:
                    continue
                run = pending.pop(0)
                launched += 1
                try:
                    process, log = _launch(run, root, gpu, cpu_slots=slots.count(None))
                except OSError as exc:  # e.g. unwritable log folder: this run fails alone
                    run.status, run.extra['reason'] = 'failed', f'could not start: {exc}'
                    print(f'[{launched}/{total}] failed to start {run.name}: {exc}', flush=True)
                    continue
                run.status = 'running'
                running[slot] = (run, process, log, time.time())
                where = f' on GPU {gpu}' if gpu is not None else ''
                print(f'[{launched}/{total}] start {run.name}{where}', flush=True)
            time.sleep(POLL_SECONDS)
            for slot in list(running):
                run, process, log, started = running[slot]
                returncode = process.poll()
                if returncode is None:
                    continue
                log.close()
                del running[slot]
                _finish(run, returncode, root, started)
                message = f'{run.status} {run.name} (exit {returncode}, {run.seconds:.1f} s)'
                if run.status == 'failed':
                    message += f': {run.extra["reason"]} (log: {os.path.join(root, run.log)})'
                print(message, flush=True)
                print(progress_line(runs, slots, sweep_started), flush=True)
    except KeyboardInterrupt:
        print('interrupted: stopping the running runs', flush=True)
        for run, process, log, started in running.values():
            if process.poll() is None:
                process.terminate()
        deadline = time.time() + TERMINATE_GRACE_SECONDS
        for run, process, log, started in running.values():
            try:
                process.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
            run.status, run.returncode = 'interrupted', process.returncode
        for run in runs:
            if run.status == 'pending':
                run.status = 'not started'
        return True
    return False


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_all_handling_sigterm(runs, root, slots):
    """run_all, with SIGTERM stopping the runs like Ctrl-C instead of orphaning them."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    except ValueError:  # not the main thread: leave signals alone
        return run_all(runs, root, slots)
    try:
        return run_all(runs, root, slots)
    finally:
        signal.signal(signal.SIGTERM, previous)
