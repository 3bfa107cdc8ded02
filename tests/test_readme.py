"""The README's examples run as written (its command-line block and its Python block), so it cannot drift.

The command-line block runs as groups of lines (each `ntkal` line with the lines that read what it writes), so
that pytest-xdist's workers can share them; each group starts with the block's set-up lines (`D=...`)."""
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


def _groups():
    """The command-line block as (set-up lines, [command lines]) groups: a line that names a file an earlier
    line writes with --out joins that line's group."""
    lines = [ln for ln in _blocks("bash")[0].splitlines() if ln.strip()]
    setup = [ln for ln in lines if not ln.startswith("ntkal ")]
    groups, writer = [], {}
    for ln in (ln for ln in lines if ln.startswith("ntkal ")):
        reads = [g for out, g in writer.items() if re.search(rf"\s{re.escape(out)}(\s|$)", ln)]
        group = reads[0] if reads else len(groups)
        if not reads:
            groups.append([])
        groups[group].append(ln)
        out = re.search(r"--out (\S+)", ln)
        if out:
            writer[out.group(1)] = group
    return setup, groups


# What each output of the block must hold (an output not named here fails the test: a new README line needs a check).
def _check_picks(p):
    import ase.io
    picks = ase.io.read(p, ":")
    assert len(picks) == 20 and all("ntkal_force_error" in a.info for a in picks)


def _count(n):
    def check(p):
        import ase.io
        assert len(ase.io.read(p, ":")) == n
    return check


def _exists(*names):
    def check(p):
        for name in names:
            assert (p / name).exists(), name
    return check


CHECKS = {"picks.extxyz": _check_picks, "scored.extxyz": _count(600), "picks_pv.extxyz": _count(10),
          "rescored.extxyz": _count(600), "evaluation": _exists("evaluate.json", "evaluate.png"),
          "si.ntkal": lambda p: p.is_file()}


def test_readme_has_examples():
    assert len(_blocks("bash")) >= 1 and len(_blocks("python")) >= 1
    setup, groups = _groups()
    assert setup and sum(len(g) for g in groups) >= 5 and any(len(g) > 1 for g in groups)


@pytest.mark.parametrize("group", range(len(_groups()[1])))
def test_readme_command_line_examples(tmp_path, group):
    setup, groups = _groups()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    script = "\n".join(setup + groups[group]) + "\n"
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    outs = [re.search(r"--out (\S+)", ln).group(1) for ln in groups[group] if "--out " in ln]
    assert outs
    for out in outs:
        assert out in CHECKS, f"README writes {out}: add what it must hold to CHECKS"
        CHECKS[out](tmp_path / out)


def test_readme_python_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for block in _blocks("python"):
        exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
