"""The release files' downloads are refused in one line where they cannot go, and leave nothing.

The MNIST data (a failed download removes every folder it created) and the embedding files of
python -m resnet_ode.embeddings: unwritable places, names that are not regular files (no hang
on /dev/zero or a FIFO), usage errors, and the folder they go to is ignored by git.
"""
import os
import shutil
import subprocess

import pytest

from conftest import REPO, folder_snapshot, run_script
from resnet_ode import embeddings


def _one_line_error(proc):
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if not line.startswith('warning:')]
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
    return lines[0]


def _error_line(stderr: str) -> str:
    """The single 'error: ...' line of stderr (warnings aside), with no traceback."""
    assert 'Traceback' not in stderr, stderr
    lines = [line for line in stderr.splitlines() if not line.startswith('warning:')]
    assert len(lines) == 1 and lines[0].startswith('error: '), stderr
    return lines[0]


# --- a failed download removes every folder it created --------------------------------------------

def test_failed_download_removes_the_parent_folders_it_created(tmp_path):
    proc = run_script('MNIST_experiments.py', '--data_root', 'a/b/c', '--epochs', '0', '--save', 'x.pkl',
                      cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and 'could not be downloaded' in _one_line_error(proc)
    assert folder_snapshot(tmp_path) == []


# --- embeddings.py: unwritable places and usage errors --------------------------------------------

@pytest.mark.parametrize('make_dir, text', [
    (lambda tmp: tmp / 'a_file', 'is not a folder'),
    (lambda tmp: tmp / 'a_file' / 'below', 'cannot write in'),
    (lambda tmp: '/proc/no_such_folder', 'cannot write in'),
    (lambda tmp: '', 'must name a folder'),
])
def test_download_to_an_unwritable_place_is_one_line(tmp_path, monkeypatch, capsys, make_dir, text):
    (tmp_path / 'a_file').write_text('not a folder')
    monkeypatch.setattr(embeddings, 'DOWNLOAD_URL', 'http://127.0.0.1:9/')  # never reached
    status = embeddings.main(embeddings.get_args_parser().parse_args(['--download', '--dir', str(make_dir(tmp_path))]))
    assert status == 2
    assert text in _error_line(capsys.readouterr().err)
    assert folder_snapshot(tmp_path) == ['a_file']


def test_embeddings_status_of_a_file_is_an_error(tmp_path, capsys):
    (tmp_path / 'a_file').write_text('not a folder')
    assert embeddings.main(embeddings.get_args_parser().parse_args(['--dir', str(tmp_path / 'a_file')])) == 2
    assert _error_line(capsys.readouterr().err) == f'error: --dir {tmp_path / "a_file"} is not a folder'


def test_embeddings_usage_errors_are_one_line(tmp_path):
    proc = run_script('resnet_ode.embeddings', '--no_such_flag', cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == ('python -m resnet_ode.embeddings: error: unrecognized arguments: --no_such_flag '
                           '(see --help)\n')


def test_the_embedding_folder_is_ignored_by_git():
    if shutil.which('git') is None or not (REPO / '.git').exists():
        pytest.skip('not a git checkout')
    proc = subprocess.run(['git', 'check-ignore', '-q', 'MNIST_pretrained_models/8channels_0pass_input_embedding.pt'],
                          cwd=REPO)
    assert proc.returncode == 0


# --- no hang on a release name that is /dev/zero, a FIFO or a folder ------------------------------

@pytest.mark.parametrize('kind', ['dev_zero', 'fifo', 'folder'])
def test_download_refuses_a_release_name_that_is_not_a_regular_file(tmp_path, kind):
    folder = tmp_path / 'emb'
    folder.mkdir()
    target = folder / '8channels_0pass_input_embedding.pt'
    {'dev_zero': lambda: target.symlink_to('/dev/zero'), 'fifo': lambda: os.mkfifo(target),
     'folder': target.mkdir}[kind]()
    proc = run_script('resnet_ode.embeddings', '--download', '--dir', folder, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    line = _error_line(proc.stderr)
    assert str(target) in line and 'not a regular file' in line and 'move it away' in line
