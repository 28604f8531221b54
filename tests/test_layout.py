"""The code's layout: no import cycles, short functions in the engine's modules, an engine that
names no dataset or residual type, torch-free helpers, and files with the usual permissions."""
import ast
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, run_script

MODULES = sorted(p.stem for p in REPO.glob('*.py'))


def _imports(module: str) -> set:
    """Project modules that `module` imports anywhere (top level or inside functions)."""
    tree = ast.parse((REPO / f'{module}.py').read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split('.')[0])
    return found & set(MODULES)


def test_no_import_cycles():
    graph = {module: _imports(module) for module in MODULES}

    def reaches(start, target, seen):
        for nxt in graph[start]:
            if nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})):
                return True
        return False

    cycles = [module for module in MODULES if reaches(module, module, {module})]
    assert cycles == [], {module: graph[module] for module in cycles}


@pytest.mark.parametrize('module', ['engine', 'cli', 'runstate'])
def test_functions_are_short(module):
    tree = ast.parse((REPO / f'{module}.py').read_text())
    lengths = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    limits = {'fit': 70}
    too_long = {name: n for name, n in lengths.items() if n > limits.get(name, 60)}
    assert lengths and too_long == {}


def test_engine_names_no_dataset_or_residual_type():
    source = (REPO / 'engine.py').read_text()
    assert re.findall(r"'MNIST'|'CIFAR10'|'RKHS'|'SHL'", source) == []


@pytest.mark.parametrize('module', ['reproduce', 'plot_figures', 'common', 'embeddings'])
def test_helpers_import_without_torch(module):
    code = ('import sys\n'
            'class Block:\n'
            '    def find_spec(self, name, path=None, target=None):\n'
            '        if name.split(".")[0] in ("torch", "torchvision", "torchdiffeq"):\n'
            '            raise ImportError("blocked " + name)\n'
            'sys.meta_path.insert(0, Block())\n'
            f'import {module}\n')
    proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize('umask, mode', [(0o022, 0o644), (0o077, 0o600)])
def test_results_and_checkpoints_get_the_umasks_permissions(tmp_path, umask, mode):
    env = {'RESNET_ODE_FAULT': 'step@1:SIGTERM'}  # stop after one step: the resume state stays
    argv = ['--synthetic', '--subset', '64', '--layers', '1', '--in_channels', '4', '--dim_int', '4',
            '--epochs', '1', '--batch_size', '32', '--seed', '0', '--save', 'm.pkl']
    previous = os.umask(umask)  # inherited by the child process
    try:
        stopped = run_script('MNIST_experiments.py', *argv, cwd=tmp_path, env=env)
        resume_mode = (tmp_path / 'MNIST_experiments' / 'm.resume.pt').stat().st_mode & 0o777
        finished = run_script('MNIST_experiments.py', '--save', 'm.pkl', '--resume', '--synthetic',
                              cwd=tmp_path)
    finally:
        os.umask(previous)
    assert stopped.returncode == 143 and finished.returncode == 0, finished.stderr
    assert resume_mode == mode
    for path in ('MNIST_experiments/m.pkl', 'MNIST_checkpoint/m.pth'):
        assert (tmp_path / path).stat().st_mode & 0o777 == mode, path
