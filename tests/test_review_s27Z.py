"""scripts/setup.sh run on a fake virtual environment: its bin/python runs this Python with a
fake torch on the path, and answers `-m pip` with a given shell line, so that no pip, index or
network is ever used."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "scripts" / "setup.sh"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="bash scripts")


def _write_script(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o755)


def _fake_venv(venv: Path, torch_version: str | None, pip_line: str) -> Path:
    """A folder that setup.sh takes for a virtual environment with pip (and torch)."""
    site = venv / "site"
    site.mkdir(parents=True)
    (venv / "bin").mkdir()
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n", encoding="utf-8")
    if torch_version is not None:
        (site / "torch").mkdir()
        (site / "torch" / "__init__.py").write_text(
            f"__version__ = {torch_version!r}\n", encoding="utf-8"
        )
        info = site / f"torch-{torch_version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: torch\nVersion: {torch_version}\n", encoding="utf-8"
        )
    _write_script(
        venv / "bin" / "python",
        "#!/bin/sh\n"
        f'if [ "$1" = -m ] && [ "$2" = pip ]; then {pip_line}; fi\n'
        f'PYTHONPATH="{site}" exec "{sys.executable}" "$@"\n',
    )
    return venv


def _run(args, env_extra, cwd=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "MEDSEG_TORCH", "CDPATH")}
    env.update(env_extra)
    return subprocess.run(
        ["bash", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_ctrl_c_during_pip_stops_setup_without_the_torch_advice(tmp_path):
    # Ctrl-C reaches pip and bash alike; pip ends with status 1 (not by the signal), so bash went
    # on and told the user to set MEDSEG_TORCH (to PyPI's CUDA build) after their own Ctrl-C
    venv = _fake_venv(tmp_path / "v env", None, 'echo "pip ran" >&2; kill -INT $PPID; exit 1')
    done = _run([str(SETUP)], {"MEDSEG_VENV": str(venv), "MEDSEG_TORCH": "torch==9.9"})
    assert done.returncode == 130, done.stderr
    assert "pip ran" in done.stderr
    assert "interrupted" in done.stderr
    assert "MEDSEG_TORCH" not in done.stderr


@pytest.mark.parametrize("version", ["2.5.1+cu121", "2.7.0a0+git1234"])
def test_a_torch_older_than_2_8_is_named_before_pip(tmp_path, version):
    # the user's torch is kept, so pip could only answer 'ResolutionImpossible' (with --quiet,
    # without saying that torch was the conflict)
    venv = _fake_venv(tmp_path / "venv", version, 'echo "pip ran" >&2; exit 3')
    done = _run([str(SETUP)], {"MEDSEG_VENV": str(venv)})
    assert done.returncode == 1, done.stderr
    assert "pip ran" not in done.stderr
    assert f"has torch {version}, and medseg needs torch 2.8 or newer" in done.stderr


@pytest.mark.parametrize("version", ["2.8.0", "2.10.1+cu130", "3.0.0rc1"])
def test_a_torch_of_2_8_or_newer_is_kept_and_pinned(tmp_path, version):
    venv = _fake_venv(tmp_path / "venv", version, 'echo "pip $*" >&2; exit 3')
    done = _run([str(SETUP)], {"MEDSEG_VENV": str(venv)})
    assert done.returncode == 3, done.stderr
    assert f"using the installed torch {version}" in done.stdout
    assert f"pip install --quiet -e .[test] torch=={version}" in done.stderr


def test_a_python3_11_that_does_not_run_gives_way_to_python3(tmp_path):
    # pyenv puts a python3.11 shim on PATH for an installed 3.11 that is not selected; setup
    # took it and stopped ('python3.11 is not Python 3.10 or newer') though python3 ran
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_script(
        bin_dir / "python3.11",
        '#!/bin/sh\necho "pyenv: python3.11: command not found" >&2\nexit 127\n',
    )
    venv = tmp_path / "venv"
    # python3 -m venv DIR makes the fake environment; anything else runs this Python
    _write_script(
        bin_dir / "python3",
        "#!/bin/sh\n"
        'if [ "$1" = -m ] && [ "$2" = venv ]; then\n'
        f'  "{sys.executable}" -c "import sys, pathlib; '
        "sys.path.insert(0, sys.argv[1]); import test_review_s27Z as t; "
        "t._fake_venv(pathlib.Path(sys.argv[2]), '2.9.1+cu128', 'echo pip ran >&2; exit 3')\" "
        f'"{Path(__file__).parent}" "$3"\n'
        "  exit\n"
        "fi\n"
        f'exec "{sys.executable}" "$@"\n',
    )
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    done = _run([str(SETUP)], {"MEDSEG_VENV": str(venv), "PATH": path})
    assert "not Python 3.10 or newer" not in done.stderr
    assert "setup: creating" in done.stdout, done.stderr
    assert "pip ran" in done.stderr


@pytest.mark.parametrize("script", ["setup.sh", "demo.sh"])
def test_an_exported_cdpath_does_not_move_the_scripts(tmp_path, script):
    # `bash scripts/demo.sh` from the checkout with CDPATH naming a folder that has a scripts/:
    # `cd scripts/..` went there (and printed its name, so demo.sh's REPO was two lines)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "scripts").mkdir(parents=True)
    venv = _fake_venv(tmp_path / "venv", "2.9.1+cu128", "exit 0")
    _write_script(venv / "bin" / "medseg", '#!/bin/sh\nprintf "[%s]" "$@"\n')
    done = _run(
        [f"scripts/{script}", "--out", "my out", "x"],
        {"MEDSEG_VENV": str(venv), "CDPATH": str(elsewhere)},
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert f" {REPO} torch " in (venv / ".medseg-setup").read_text(encoding="utf-8")
    if script == "demo.sh":
        assert done.stdout.endswith("[demo][--out][my out][x]")


def _fake_dist(site: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    lines = [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"]
    lines += [f"Requires-Dist: {line}\n" for line in requires]
    (info / "METADATA").write_text("".join(lines), encoding="utf-8")


@pytest.mark.parametrize(
    "ruff, other, pip_again",
    [
        ("0.17.6", (), False),
        # a ruff (or numpy ...) changed by hand or by another package's install stayed: only the
        # names were looked up
        ("0.17.5", (), True),
        # a requirement of an extra that is not installed (or for another platform) sent every
        # run to pip: markers were cut off, not read
        ("0.17.6", ('absent>=1; extra == "docs"', 'absent>=1; sys_platform == "nonesuch"'), False),
    ],
)
def test_setup_skips_pip_only_when_every_requirement_is_met(tmp_path, ruff, other, pip_again):
    venv = _fake_venv(tmp_path / "venv", "2.9.1+cu128", "echo pip ran >&2; exit 0")
    requires = ("torch>=2.8", 'ruff==0.17.6; extra == "test"', *other)
    _fake_dist(venv / "site", "medseg", "0.1.0", requires)
    _fake_dist(venv / "site", "ruff", ruff)
    first = _run([str(SETUP)], {"MEDSEG_VENV": str(venv)})
    assert "pip ran" in first.stderr, first.stderr
    again = _run([str(SETUP)], {"MEDSEG_VENV": str(venv)})
    assert again.returncode == 0, again.stderr
    assert ("pip ran" in again.stderr) == pip_again, again.stdout
