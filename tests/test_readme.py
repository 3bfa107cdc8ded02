"""The README's examples run as written (its command-line block and its Python block), so it cannot drift."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang):
    text = README.read_text()
    usage = text[text.index("## Using it"):]
    return re.findall(rf"```{lang}\n(.*?)```", usage, flags=re.S)


def test_readme_has_examples():
    assert len(_blocks("bash")) >= 1 and len(_blocks("python")) >= 1


def test_readme_command_line_examples(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for block in _blocks("bash"):
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", block + "\n"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stderr[-3000:]
    import ase.io
    picks = ase.io.read(tmp_path / "picks.extxyz", ":")
    assert len(picks) == 20 and all("ntkal_force_error" in a.info for a in picks)
    assert len(ase.io.read(tmp_path / "scored.extxyz", ":")) == 600
    assert (tmp_path / "evaluation" / "evaluate.json").exists() and (tmp_path / "evaluation" / "evaluate.png").exists()
    assert len(ase.io.read(tmp_path / "picks_pv.extxyz", ":")) == 10
    assert (tmp_path / "si.ntkal").exists() and len(ase.io.read(tmp_path / "rescored.extxyz", ":")) == 600


def test_readme_python_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for block in _blocks("python"):
        exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
