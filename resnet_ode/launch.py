"""Starting a training run: claim its files, join the process group, draw the seed.

The claim (locks and folders) comes before any work, so that a second process with the same
--save, or a folder that cannot be written, is refused at once. If the run then fails (a
refusal, missing data, any exception), what the claim created is removed again.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Optional

import torch

from . import distributed, gate, protocol
from .run_files import RunClaim, member_runs, prepare_run
from .signals import StopRequest


@dataclass
class Started:
    """A run that has claimed its files: its Config (stored, on --resume), its members (each a
    single run's Config and paths), its resume state, device, process group, and the record of
    SIGINT/SIGTERM, active from the start."""
    config: gate.Config
    members: list
    resume_path: str
    resume_state: Optional[dict]
    device: torch.device
    dist: object
    stop: StopRequest
    code_version: str = 'unknown'


@contextlib.contextmanager
def start_run(config):
    """The run of a validated Config, claimed and started (see the module's docstring)."""
    claim = RunClaim()
    failed = True
    with StopRequest() as stop:
        try:
            config, resume_path, resume_state = prepare_run(config, claim)
            dist = distributed.setup(gate.pick_device(config))
            try:
                if config.seed is None and not getattr(config, 'seeds', None):
                    # drawn once, on rank 0, and recorded in the pickle
                    config = config.replace(seed=dist.broadcast_int(random.SystemRandom().randrange(2 ** 31)))
                config = config.rules.resolved(config)
                members = member_runs(config)
                device = dist.device if dist.world_size > 1 else gate.pick_device(config)
                yield Started(config, members, resume_path, resume_state, device, dist, stop,
                              protocol.code_version())
                failed = False
            finally:
                dist.close(together=not failed)
        finally:
            stop.defer()  # a signal now must not cut the release short
            claim.release(failed)
