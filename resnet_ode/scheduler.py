"""Run a list of jobs as subprocesses, a few at a time, on CPU or GPU slots.

Each job's output is appended to its log after a header naming the attempt, so that a log is
never truncated (a resumed run keeps its first epochs). A sweep holds a job's log while the job
runs: a second sweep on the same folder finds it held and reports the job as "running
elsewhere", as it does a job whose script refused it because another process holds its files
(RUNNING_ELSEWHERE); neither is a failure. After each job, one progress line: how many are done,
running, waiting and failed, and an estimate of the time left. Ctrl-C or SIGTERM stops the
running jobs (they save their resume states) and marks the rest not started.

sweep.py builds the jobs (SweepRun extends Job); this module knows nothing of figures.
"""
import contextlib
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from .errors import EXIT_DIVERGED, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE, RUNNING_ELSEWHERE
from .files import atomic_write

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
    from .protocol import code_version
    try:
        with open(path) as stream:
            history = json.load(stream).get('invocations', [])
    except (OSError, ValueError, AttributeError):
        history = []
    history = [entry for entry in history if isinstance(entry, dict)
               and entry.get('started_unix') != started]  # this invocation's is replaced
    invocation = {
        'started_unix': started, 'started': clock(started), 'finished': clock(finished) if finished else None,
        'argv': list(argv), 'cwd': cwd, 'code_version': code_version(),
        'runs': [{'name': job.name, 'command': job.command(), 'status': job.status,
                  'returncode': job.returncode, 'seconds': job.seconds,
                  'pickles': job.pickles, 'log': job.log, **job.extra} for job in jobs],
    }
    atomic_write(path, lambda stream: (json.dump(
        {**header, 'invocations': history + [invocation]}, stream, indent=1), stream.write('\n')), binary=False)


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


class HeldElsewhere(Exception):
    """Another sweep runs this job now (it holds the job's log)."""


class DoneElsewhere(Exception):
    """Another sweep finished this job since this sweep listed it: its results are there."""


@dataclass
class Attempt:
    """One start of a job: its process, its log (held by this sweep while it runs), and where
    the log stood when it started (this attempt's lines follow)."""
    process: subprocess.Popen
    log: object
    lock: tuple  # (path, fd) of the lock beside the log
    started: float
    log_start: int

    def close(self):
        self.log.close()
        with contextlib.suppress(OSError):
            os.remove(self.lock[0])  # removed while held, then unlocked: as a run's own locks
        os.close(self.lock[1])


def _hold_log(log_path: str) -> tuple:
    """An exclusive lock beside the job's log, so that two sweeps never write one log at once: a
    job whose log another sweep holds is running there (HeldElsewhere). (path, fd)."""
    folder, name = os.path.split(log_path)
    path = os.path.join(folder, f'.{name}.lock')
    for _ in range(10):  # a holder that finishes removes the file between our open and our lock
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HeldElsewhere from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            return path, fd
        os.close(fd)
    raise HeldElsewhere


def _launch(run, root, gpu, cpu_slots=1) -> Attempt:
    """Start the run, its output appended to its log after a header naming the attempt (a log is
    never truncated: a resumed run keeps its first epochs)."""
    log_path = os.path.join(root, run.log)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    lock = _hold_log(log_path)
    log = None
    try:
        if all(os.path.exists(os.path.join(root, path)) for path in run.pickles):
            raise DoneElsewhere
        env = child_env(gpu, cpu_slots)
        shown = [f'{name}={env[name]}' for name in ('CUDA_VISIBLE_DEVICES', 'OMP_NUM_THREADS')
                 if name in env and env[name] != os.environ.get(name)]
        log = open(log_path, 'a')
        log.write(f'# ---- attempt started {clock(time.time())}, pid {os.getpid()} of reproduce.py\n'
                  f'# cwd: {root}\n' + ''.join(f'# {setting}\n' for setting in shown)
                  + '# ' + shlex.join(run.command()) + '\n')
        log.flush()
        log_start = log.tell()
        process = subprocess.Popen(run.command(), cwd=root, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    except BaseException:
        if log is not None:
            log.close()
        os.remove(lock[0])
        os.close(lock[1])
        raise
    return Attempt(process, log, lock, time.time(), log_start)


def last_line(path, start: int = 0):
    """The last non-empty line of a log from byte `start` on (its error, for a run that failed)."""
    try:
        with open(path, 'rb') as stream:
            stream.seek(0, os.SEEK_END)
            stream.seek(max(start, stream.tell() - 4096))
            lines = [line for line in stream.read().decode(errors='replace').splitlines()
                     if line.strip() and not line.startswith('# ')]
    except OSError:
        return ''
    return lines[-1].strip()[:300] if lines else ''


def _signal_reason(returncode) -> str | None:
    """How a run ended by a signal: killed (a negative return code), or stopped cleanly on
    SIGINT/SIGTERM (130, 143). Either way a rerun of the sweep resumes it."""
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else f'signal {-returncode}'
        return f'killed by {name}; rerun the sweep to resume it from its last saved epoch'
    if returncode in (EXIT_SIGINT, EXIT_SIGTERM):
        return (f'stopped by {"SIGINT" if returncode == EXIT_SIGINT else "SIGTERM"} (its state is saved); '
                f'rerun the sweep to resume it')
    return None


def _finish(run, returncode, root, attempt: Attempt):
    run.returncode = returncode
    run.seconds = round(time.time() - attempt.started, 2)
    has_pickle = all(os.path.exists(os.path.join(root, path)) for path in run.pickles)
    reason = last_line(os.path.join(root, run.log), attempt.log_start)
    if returncode == EXIT_OK and has_pickle:
        run.status = 'done'
    elif returncode == EXIT_DIVERGED and has_pickle:
        run.status = 'diverged'  # finished; its curves stop early
    elif returncode == EXIT_USAGE and RUNNING_ELSEWHERE in reason:
        run.status = 'running elsewhere'  # another process holds it: not this sweep's failure
    else:
        run.status = 'failed'
        run.extra['reason'] = (f'exit {returncode} but a pickle is missing: {", ".join(run.pickles)}'
                               if returncode in (EXIT_OK, EXIT_DIVERGED) else
                               _signal_reason(returncode) or reason or f'exit {returncode}')


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
    pending, running, started = list(runs), {}, time.time()  # running: slot index -> (run, attempt)
    try:
        while pending or running:
            for slot, gpu in enumerate(slots):
                if slot not in running and pending:
                    _start_next(runs, pending, running, slot, gpu, root, slots)
            time.sleep(POLL_SECONDS)
            for slot in list(running):
                run, attempt = running[slot]
                returncode = attempt.process.poll()
                if returncode is None:
                    continue
                attempt.close()
                del running[slot]
                _finish(run, returncode, root, attempt)
                message = f'{run.status} {run.name} (exit {returncode}, {run.seconds:.1f} s)'
                if run.status == 'failed':
                    message += f': {run.extra["reason"]} (log: {os.path.join(root, run.log)})'
                print(message, flush=True)
                print(progress_line(runs, slots, started), flush=True)
    except KeyboardInterrupt:
        _stop_all(runs, running)
        return True
    return False


def _start_next(runs, pending, running, slot, gpu, root, slots):
    run = pending.pop(0)
    number = f'[{len(runs) - len(pending)}/{len(runs)}]'  # how many have been taken from `pending`
    try:
        attempt = _launch(run, root, gpu, cpu_slots=slots.count(None))
    except DoneElsewhere:
        run.status = 'done elsewhere'
        print(f'{number} {run.name}: done elsewhere meanwhile ({", ".join(run.pickles)})', flush=True)
        return
    except HeldElsewhere:
        run.status = 'running elsewhere'
        print(f'{number} {run.name}: running elsewhere (another sweep holds its log)', flush=True)
        return
    except OSError as exc:  # e.g. unwritable log folder: this run fails alone
        run.status, run.extra['reason'] = 'failed', f'could not start: {exc}'
        print(f'{number} failed to start {run.name}: {exc}', flush=True)
        return
    run.status = 'running'
    running[slot] = (run, attempt)
    print(f'{number} start {run.name}{f" on GPU {gpu}" if gpu is not None else ""}', flush=True)


def _stop_all(runs, running):
    """Ctrl-C or SIGTERM: stop the running runs (they save their resume states), wait a little,
    then kill what is left; the rest are not started."""
    print('interrupted: stopping the running runs', flush=True)
    for _, attempt in running.values():
        if attempt.process.poll() is None:
            attempt.process.terminate()
    deadline = time.time() + TERMINATE_GRACE_SECONDS
    for run, attempt in running.values():
        try:
            attempt.process.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            attempt.process.kill()
            attempt.process.wait()
        attempt.close()
        run.status, run.returncode = 'interrupted', attempt.process.returncode
    for run in runs:
        if run.status == 'pending':
            run.status = 'not started'


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
