"""`pip install -e .` into a fresh venv that already has torch leaves that torch as it was.

The venv is new and empty except for a .pth file that puts the running interpreter's site-packages
(where torch and lmprune's other dependencies already are, as on a user's CUDA machine) on its path.
pip runs offline (--no-index, --no-build-isolation): if the pyproject asked for another torch than
the one there, the resolver would need the index and fail, or reinstall it into the venv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(python: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([str(python), *args], capture_output=True, text=True, timeout=600, env=env)


# ~70 s on 2 busy cores (a venv, an editable build, three interpreters importing torch)
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LMPRUNE_SLOW") != "1", reason="builds a venv and an editable install (~70 s); "
                    "set LMPRUNE_SLOW=1")
def test_editable_install_keeps_the_torch_already_there(tmp_path: Path) -> None:
    import torch

    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "existing-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    before = json.loads(_run(python, "-c", "import json, torch; print(json.dumps([torch.__version__, torch.__file__]))").stdout)
    assert before == [torch.__version__, torch.__file__]

    # a copy of the project: the editable build writes egg-info next to the sources
    project = tmp_path / "project"
    for name in ("pyproject.toml", "README.md", "src"):
        src = REPO / name
        dst = project / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    result = _run(python, "-m", "pip", "install", "--no-index", "--no-build-isolation", "-e", str(project))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "torch" not in result.stdout.split("Successfully installed")[-1]
    after = json.loads(_run(python, "-c", "import json, torch; print(json.dumps([torch.__version__, torch.__file__]))").stdout)
    assert after == before  # the same torch, from the same place
    assert not list(site.glob("torch*"))  # nothing torch-like was put into the new venv
    where = _run(python, "-c", "import lmprune; print(lmprune.__file__)").stdout.strip()
    assert where == str(project / "src" / "lmprune" / "__init__.py")
