"""The code's layout: what a user runs on top and one package below, one job per module, no
import cycles, short functions and classes, names defined once, a training loop that names no
dataset, torch-free readers, and files with the usual permissions."""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_script

PACKAGE = 'resnet_ode'
TOP_LEVEL = ('CIFAR_experiments', 'MNIST_experiments', 'models', 'plot_figures', 'release_runs',
             'reproduce', 'synthetic_experiments')
FILES = sorted([REPO / f'{name}.py' for name in TOP_LEVEL] + list((REPO / PACKAGE).glob('*.py')))


def _module(path: Path) -> str:
    return path.stem if path.parent == REPO else f'{PACKAGE}.{path.stem}'


MODULES = {_module(path): path for path in FILES}


def _imports(path: Path) -> set:
    """Project modules that the file imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:  # relative: inside the package
                base = PACKAGE + ('.' + base if base else '')
            found.update(f'{base}.{alias.name}' if base == PACKAGE else base for alias in node.names)
    return found & set(MODULES)


def test_the_top_level_holds_only_what_a_user_runs():
    assert sorted(path.stem for path in REPO.glob('*.py')) == sorted(TOP_LEVEL)


def test_no_import_cycles():
    graph = {module: _imports(path) for module, path in MODULES.items()}

    def reaches(start, target, seen):
        return any(nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt}))
                   for nxt in graph[start])

    cycles = [module for module in graph if reaches(module, module, {module})]
    assert cycles == [], {module: graph[module] for module in cycles}


def test_no_module_imports_by_name_or_edits_the_path():
    offending = [path.name for path in FILES
                 if re.search(r'importlib|sys\.path\.(insert|append)|__import__', path.read_text())]
    assert offending == []


@pytest.mark.parametrize('path', FILES, ids=lambda path: _module(path))
def test_functions_and_classes_are_short(path):
    tree = ast.parse(path.read_text())
    long_functions = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > 60}
    long_classes = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
                    if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 150}
    assert (long_functions, long_classes) == ({}, {})


@pytest.mark.parametrize('path', FILES, ids=lambda path: _module(path))
def test_each_module_names_its_job_first(path):
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    assert docstring and len(docstring.splitlines()[0]) > 20


def test_public_class_names_are_unique():
    names = [(node.name, _module(path)) for path in FILES for node in ast.parse(path.read_text()).body
             if isinstance(node, ast.ClassDef) and not node.name.startswith('_')]
    repeated = {name for name, _ in names if [n for n, _ in names].count(name) > 1}
    assert repeated == set(), [item for item in names if item[0] in repeated]


@pytest.mark.parametrize('pattern', [r'^EXIT_\w+\s*=', r'^\s*(EXIT_\w+,\s*)+EXIT_\w+\s*=',
                                     r'def seed_list_text', r'def nearest_existing', r'FIGURES = \(',
                                     r"RESUME_SUFFIX\s*=|RESUME_SUFFIX, BATCH_RESUME_SUFFIX\s*="])
def test_defined_once(pattern):
    where = [path.name for path in FILES if re.search(pattern, path.read_text(), flags=re.M)]
    assert len(where) == 1, where


def test_the_training_loop_names_no_dataset_or_residual_type():
    for name in ('training', 'training_state', 'saving', 'evaluation', 'launch'):
        source = (REPO / PACKAGE / f'{name}.py').read_text()
        assert re.findall(r"'MNIST'|'CIFAR10'|'RKHS'|'SHL'", source) == [], name


@pytest.mark.parametrize('module', ['reproduce', 'plot_figures', 'release_runs', f'{PACKAGE}.safe_pickle',
                                    f'{PACKAGE}.embeddings', f'{PACKAGE}.recorded_runs', f'{PACKAGE}.protocol'])
def test_readers_import_without_torch(module):
    code = ('import sys\n'
            'class Block:\n'
            '    def find_spec(self, name, path=None, target=None):\n'
            '        if name.split(".")[0] in ("torch", "torchvision", "torchdiffeq"):\n'
            '            raise ImportError("blocked " + name)\n'
            'sys.meta_path.insert(0, Block())\n'
            f'import {module}\n')
    proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_plain_mnist_run_loads_under_4000_lines_of_the_project(tmp_path):
    """A run imports only what it uses: resuming, evaluating, pretraining, CIFAR-10, the
    synthetic experiment, the sweep and the figures stay out of a plain training run."""
    code = ('import sys, MNIST_experiments\n'
            'status = MNIST_experiments.main(MNIST_experiments.get_args_parser().parse_args(\n'
            '    ["--synthetic", "--subset", "64", "--layers", "1", "--epochs", "1", "--batch_size", "64", "--seed", "0"]))\n'
            'assert status == 0, status\n'
            'print("\\n".join(m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)))\n')
    proc = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert proc.returncode == 0, proc.stderr
    project = {path.resolve() for path in FILES}  # the project's own modules, not a .venv inside it
    loaded = {Path(path).resolve() for path in proc.stdout.split() if path.endswith('.py')} & project
    lines = sum(len(path.read_text().splitlines()) for path in loaded)
    assert 0 < lines < 4000, (lines, sorted(path.name for path in loaded))


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


def _third_party_imports(paths) -> set:
    """The top-level names of the modules the files import that are neither the standard library's
    nor the project's own."""
    own = {'conftest', 'benchmarks', PACKAGE, *TOP_LEVEL} | {path.stem for path in (REPO / 'tests').glob('*.py')} \
        | {path.stem for path in (REPO / 'benchmarks').glob('*.py')}
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split('.')[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names.add(node.module.split('.')[0])
    return names - set(sys.stdlib_module_names) - own


def test_every_package_the_code_imports_is_in_the_requirements():
    """A package that arrives only as another's dependency (scipy, through torchdiffeq) can
    vanish with that package's next release."""
    required = {re.split(r'[<>=!~ ;#\[]', line.strip())[0].lower()
                for line in (REPO / 'requirements.txt').read_text().splitlines()
                if line.strip() and not line.startswith('#')}
    paths = FILES + sorted((REPO / 'tests').glob('*.py')) + sorted((REPO / 'benchmarks').glob('*.py'))
    distribution = {'PIL': 'pillow'}  # import names that are not their package's name
    imported = {distribution.get(name, name).lower() for name in _third_party_imports(paths)}
    assert {'torch', 'scipy', 'pytest'} <= imported  # the scan sees what the project is known to use
    assert sorted(imported - required) == []
