"""flows.vcs runs git and dvc, and a failure is one line naming the command, with no secret in it."""

import subprocess

import pytest

from flows import vcs
from vim_core.errors import VimError


def test_git_answers_and_a_failure_is_one_named_line(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert vcs.git("rev-parse", "--show-toplevel", cwd=tmp_path).strip() == str(tmp_path.resolve())
    with pytest.raises(VimError) as err:
        vcs.git("rev-parse", "HEAD", cwd=tmp_path)  # no commit yet
    message = str(err.value)
    assert message.startswith("git rev-parse HEAD failed (exit 128): ") and "\n" not in message


def test_secrets_in_the_failure_are_redacted(tmp_path):
    with pytest.raises(VimError) as err:
        vcs.git("clone", "https://bob:s3cret@127.0.0.1:9/x.git", str(tmp_path / "x"), timeout=60)
    assert "s3cret" not in str(err.value) and "git clone" in str(err.value)


def test_dvc_runs_and_a_missing_executable_is_named(tmp_path):
    assert vcs.dvc("version", cwd=tmp_path, timeout=120).strip()
    with pytest.raises(VimError, match="no-such-tool x: cannot run it"):
        vcs.run(["no-such-tool", "x"])
