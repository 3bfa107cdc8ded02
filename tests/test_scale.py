"""Scale: torchrun ranks give the single-process result; a killed run resumes to the same result; flat memory."""
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch

from tiny import structures, tiny_mace

BIN = Path(sys.executable).parent
COMMON = ["--sketch-dim", "16", "--no-progress", "--chunk-size", "3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    torch.save(tiny_mace(seed=41), d / "tiny.model")
    ase.io.write(d / "train.extxyz", structures(4, seed=42))
    ase.io.write(d / "pool.extxyz", structures(20, seed=43))
    return d


def _args(files, cmd, out, *extra):
    return [cmd, "--model", str(files / "tiny.model"), "--train", str(files / "train.extxyz"),
            "--pool", str(files / "pool.extxyz"), *COMMON, "--out", str(out), *extra]


def _run(args, torchrun=0, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if torchrun:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={torchrun}", "-m", "ntkal", *args]
    else:
        cmd = [str(BIN / "ntkal"), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _picks(path):
    return [(a.info["ntkal_pool_index"], a.info["ntkal_score"]) for a in ase.io.read(path, ":")]


def test_two_gloo_ranks_select_and_score_like_one_process(files, tmp_path):
    for extra in (["--budget", "5"], ["--budget", "4", "--method", "random", "--force-probes", "2"]):
        one, two = tmp_path / "one.extxyz", tmp_path / "two.extxyz"
        _run(_args(files, "select", one, *extra))
        _run(_args(files, "select", two, *extra), torchrun=2)
        a, b = _picks(one), _picks(two)
        assert [i for i, _ in a] == [i for i, _ in b]
        np.testing.assert_allclose([s for _, s in a], [s for _, s in b], rtol=1e-5)
        import json
        assert json.loads(two.with_name(two.name + ".json").read_text())["world_size"] == 2
    one, two = tmp_path / "s1.extxyz", tmp_path / "s2.extxyz"
    _run(_args(files, "score", one, "--kernel", "energy"))
    _run(_args(files, "score", two, "--kernel", "energy"), torchrun=2)
    a, b = _picks(one), _picks(two)
    assert [i for i, _ in a] == list(range(20)) == [i for i, _ in b]
    np.testing.assert_allclose([s for _, s in a], [s for _, s in b], rtol=1e-5)
    assert not list(tmp_path.glob("*.ntkal-ckpt"))


def _kill_when(args, ready, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([str(BIN / "ntkal"), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not ready() and p.poll() is None and time.time() - t0 < timeout:
        time.sleep(0.05)
    killed = p.poll() is None
    if killed:
        p.send_signal(signal.SIGKILL)
    p.wait()
    return killed


@pytest.mark.parametrize("cmd", ["select", "score"])
def test_killed_run_resumes_to_the_same_result(files, tmp_path, cmd):
    extra = ["--budget", "5", "--checkpoint-every", "0"] if cmd == "select" else ["--checkpoint-every", "0"]
    ref = tmp_path / "ref.extxyz"
    _run(_args(files, cmd, ref, *extra))
    out = tmp_path / "out.extxyz"
    ck = out.with_name(out.name + ".ntkal-ckpt")
    if cmd == "select":
        ready = lambda: (ck / "scan-rank0of1.safetensors.sha256").exists()  # noqa: E731
    else:
        ready = lambda: len(list(ck.glob("part-*.extxyz"))) >= 2  # noqa: E731
    killed = _kill_when(_args(files, cmd, out, *extra), ready)
    assert killed and ck.exists() and not out.exists()
    _run(_args(files, cmd, out, *extra))
    assert _picks(out) == _picks(ref)
    assert not ck.exists()


def test_checkpoint_of_other_settings_is_not_reused(files, tmp_path):
    out = tmp_path / "o.extxyz"
    ck = out.with_name(out.name + ".ntkal-ckpt")
    _kill_when(_args(files, "select", out, "--budget", "3", "--checkpoint-every", "0"),
               lambda: (ck / "scan-rank0of1.safetensors.sha256").exists())
    _run(_args(files, "select", out, "--budget", "3", "--seed", "9"))
    ref = tmp_path / "r.extxyz"
    _run(_args(files, "select", ref, "--budget", "3", "--seed", "9"))
    assert _picks(out) == _picks(ref)


def _peak_rss_mb(args):
    code = ("import resource, sys, runpy; sys.argv = ['ntkal'] + sys.argv[1:]\n"
            "from ntkal.cli import main\nrc = main(sys.argv[1:])\n"
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split("PEAK")[-1]) / 1024


def test_peak_memory_flat_in_pool_size(files, tmp_path):
    base = structures(50, seed=44)
    rng = np.random.default_rng(0)
    for n in (2000, 20000):
        with open(tmp_path / f"pool{n}.extxyz", "w") as fh:
            for i in range(n):
                a = base[i % len(base)].copy()
                a.positions += rng.normal(scale=0.01, size=a.positions.shape)
                ase.io.write(fh, a, format="extxyz")
    peak = {}
    for n in (2000, 20000):
        args = ["select", "--model", str(files / "tiny.model"), "--train", str(files / "train.extxyz"),
                "--pool", str(tmp_path / f"pool{n}.extxyz"), "--kernel", "embedding", "--budget", "10",
                "--no-progress", "--chunk-size", "256", "--out", str(tmp_path / f"sel{n}.extxyz")]
        peak[n] = _peak_rss_mb(args)
    assert peak[20000] <= 1.2 * peak[2000], peak
