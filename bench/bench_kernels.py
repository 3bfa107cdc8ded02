"""`python -m bench kernels`: each ntk_kernels op at the chunk sizes of the 200k-pool pipeline.

CPU: the PyTorch reference (`ntk_kernels.reference`), wall-clock median. GPU (only when
torch.cuda.is_available(); the Triton interpreter is never timed): a correctness gate of the Triton
launcher against the reference on the same inputs, then `triton.testing.do_bench` of Triton, of the
reference on CUDA tensors, and for segment_quadform of a cuBLAS GEMM G @ Linv^T of the same flops and of
the kernels' VARIANTS / SKETCH_VARIANTS (other tiles; "tf32x3": three TF32 tensor-core products per fp32 product,
close to fp32), each gated against the reference first: the H200 run found segment_quadform's default 0.8x and
tensor_sketch's 0.7-1.1x their references (bench/RESULTS.md, GPU), and these say which setting to ship.

Shapes (k = --sketch-dim, default 512):
  tensor_sketch     R = 64 structures x 30 rows, (d_in, d_out) in MACE-like layer widths, fp32;
                    plus the two-term (double-backward) variant at 128 x 128
  segment_quadform  --pool-size rows (default 200k) x k, fp32, streamed in chunks of --chunk rows; one
                    row per structure (energy/embedding rows) and 30 rows per structure (force rows)
  lcmd_update       M = 2000 shortlisted candidates x k, fp64 (as ntkal.lcmd runs it) and fp32
"""
from __future__ import annotations

import argparse
import functools
import math
import os

from . import utils

SKETCH_SHAPES = ((16, 16), (16, 128), (64, 64), (128, 128), (256, 256))
# TF32 may be used by Triton's tl.dot on GPU: 1e-2 relative RMS is the gate (references are fp32 IEEE)
GATE = 1e-2
# segment_quadform meta-parameters timed beside the default on a GPU (fp32 rows; "tf32" alone is below the
# fp32 accuracy docs/design.md asks of the kernels, timed only as the tensor-core ceiling)
VARIANTS = {
    f"{prec} {r}x{j}x{l} w{w} s{st}": dict(PRECISION=prec, BLOCK_R=r, BLOCK_J=j, BLOCK_L=l, num_warps=w, num_stages=st)
    for prec in ("ieee", "tf32x3") for (r, j, l, w, st) in ((64, 64, 32, 4, 3), (128, 128, 32, 8, 3), (128, 64, 32, 4, 3),
                                                           (64, 128, 64, 4, 2))
}
VARIANTS["tf32 128x128x32 w8 s3"] = dict(PRECISION="tf32", BLOCK_R=128, BLOCK_J=128, BLOCK_L=32, num_warps=8,
                                         num_stages=3)
# tensor_sketch: rows x sketch columns x reduction chunk (its segments per program stay the default's)
SKETCH_VARIANTS = {
    f"{prec} {r}x{kk}x{d} w{w}": dict(PRECISION=prec, BLOCK_R=r, BLOCK_K=kk, BLOCK_D=d, num_warps=w)
    for prec in ("ieee", "tf32x3") for (r, kk, d, w) in ((64, 64, 32, 4), (32, 128, 32, 4), (64, 128, 64, 8),
                                                        (128, 64, 32, 4))
}


# --------------------------------------------------------------------------------------------------
# cases: each returns (name, shape dict, flops, bytes, make_inputs(device), ref(inputs), tri(inputs), gemm)
# --------------------------------------------------------------------------------------------------

def _seg(n_seg, rows_per, device):
    import torch
    return torch.arange(n_seg, device=device).repeat_interleave(rows_per)


def sketch_case(d_in, d_out, k, n_struct=64, rows_per=30, two_term=False):
    import torch
    import ntk_kernels.reference as ref
    R = n_struct * rows_per

    def make(device, dtype=torch.float32):
        g = torch.Generator().manual_seed(0)
        t = {"x": torch.randn(R, d_in, generator=g), "dy": torch.randn(R, d_out, generator=g),
             "A": torch.randn(d_in, k, generator=g), "B": torch.randn(d_out, k, generator=g),
             "x2": torch.randn(R, d_in, generator=g) if two_term else None,
             "dy2": torch.randn(R, d_out, generator=g) if two_term else None}
        t = {n: (v.to(device=device, dtype=dtype) if v is not None else None) for n, v in t.items()}
        t["seg"] = _seg(n_struct, rows_per, device)
        return t

    def run_ref(t):
        return ref.tensor_sketch_ref(t["x"], t["dy"], t["A"], t["B"], t["seg"], n_struct, t["x2"], t["dy2"])

    def run_tri(t, blocks=None):
        from ntk_kernels.ops.tensor_sketch import tensor_sketch_triton
        return tensor_sketch_triton(t["x"], t["dy"], t["A"], t["B"], t["seg"], n_struct, t["x2"], t["dy2"],
                                    blocks=blocks)

    terms = 2 if two_term else 1
    flops = terms * (2.0 * R * (d_in + d_out) * k + 2.0 * R * k)
    nbytes = 4.0 * (terms * R * (d_in + d_out) + (d_in + d_out) * k + n_struct * k)
    name = f"tensor_sketch{' 2-term' if two_term else ''}"
    shape = f"R={R} ({n_struct}x{rows_per}), d_in={d_in}, d_out={d_out}, k={k}"
    return {"op": name, "shape": shape, "flops": flops, "bytes": nbytes, "make": make, "ref": run_ref,
            "tri": run_tri, "gemm": None, "structures": n_struct, "out": lambda o: o, "ref_one": run_ref,
            "variants": {n: functools.partial(run_tri, blocks=b) for n, b in SKETCH_VARIANTS.items()},
            "variant_loop": lambda fn: fn}


def quadform_case(n_rows, k, chunk, rows_per=1):
    """The whole pool pass: n_rows rows in chunks of `chunk` rows (rows_per rows per structure)."""
    import torch
    import ntk_kernels.reference as ref
    chunk = max(rows_per, (chunk // rows_per) * rows_per)
    n_chunks = math.ceil(n_rows / chunk)

    def make(device, dtype=torch.float32):
        g = torch.Generator().manual_seed(0)
        # one chunk's rows reused for every chunk (the pool's values do not change the cost)
        G = torch.randn(chunk, k, generator=g)
        L = torch.linalg.cholesky(torch.eye(k, dtype=torch.float64) + (lambda a: a @ a.T / k)(
            torch.randn(k, k, generator=g, dtype=torch.float64)))
        Linv = torch.linalg.solve_triangular(L, torch.eye(k, dtype=torch.float64), upper=False)
        return {"G": G.to(device=device, dtype=dtype), "Linv": Linv.to(device=device, dtype=dtype),
                "seg": _seg(chunk // rows_per, rows_per, device),
                "w": torch.rand(chunk, generator=g).to(device=device, dtype=dtype), "n_seg": chunk // rows_per}

    def loop(fn):
        def go(t):
            out = None
            for _ in range(n_chunks):
                out = fn(t)
            return out
        return go

    run_ref = loop(lambda t: ref.segment_quadform_ref(t["G"], t["Linv"], t["seg"], t["w"], t["n_seg"]))

    def _tri(t, blocks=None):
        from ntk_kernels.ops.segment_quadform import segment_quadform_triton
        return segment_quadform_triton(t["G"], t["Linv"], t["seg"], t["w"], t["n_seg"], blocks=blocks)

    def _gemm(t):
        return t["G"] @ t["Linv"].T
    flops = 2.0 * n_chunks * chunk * k * k
    nbytes = 4.0 * n_chunks * (chunk * k + k * k + 2 * chunk)
    return {"op": "segment_quadform", "shape": f"{n_chunks}x[{chunk}x{k}] ({rows_per} row/struct), total "
                                              f"{n_chunks * chunk:,} rows",
            "flops": flops, "bytes": nbytes, "make": make, "ref": run_ref, "tri": loop(_tri), "gemm": loop(_gemm),
            "structures": n_chunks * chunk // rows_per, "out": lambda o: o[0], "tri_one": _tri,
            "variants": {name: functools.partial(_tri, blocks=b) for name, b in VARIANTS.items()},
            "variant_loop": loop,
            "ref_one": lambda t: ref.segment_quadform_ref(t["G"], t["Linv"], t["seg"], t["w"], t["n_seg"])}


def lcmd_case(M, k, dtype_name):
    import torch
    import ntk_kernels.reference as ref

    def make(device, dtype=None):
        dt = getattr(torch, dtype_name)
        g = torch.Generator().manual_seed(0)
        psi = torch.randn(M, k, generator=g, dtype=torch.float64).to(device=device, dtype=dt)
        c = torch.randn(k, generator=g, dtype=torch.float64).to(device=device, dtype=dt)
        d0 = (float(k) * 2.0) * torch.rand(M, generator=g, dtype=torch.float64).to(device=device, dtype=dt)
        return {"psi": psi, "c": c, "d0": d0, "dmin2": d0.clone(),
                "owner": torch.zeros(M, dtype=torch.int64, device=device)}

    def run_ref(t):
        return ref.lcmd_update_ref(t["psi"], t["c"], t["dmin2"], t["owner"], 7)

    def run_tri(t):
        from ntk_kernels.ops.lcmd_update import lcmd_update_triton
        return lcmd_update_triton(t["psi"], t["c"], t["dmin2"], t["owner"], 7)
    nb = (8 if dtype_name == "float64" else 4)
    return {"op": "lcmd_update", "shape": f"M={M}, k={k}, {dtype_name}", "flops": 3.0 * M * k,
            "bytes": nb * (M * k + 2 * M) + 8 * 2 * M, "make": make, "ref": run_ref, "tri": run_tri, "gemm": None,
            "structures": M, "out": lambda o: o, "inplace": True}


def cases(a):
    k = a.sketch_dim
    out = [sketch_case(di, do, k) for di, do in SKETCH_SHAPES]
    out.append(sketch_case(128, 128, k, two_term=True))
    out.append(quadform_case(a.pool_size, k, a.chunk, rows_per=1))
    out.append(quadform_case(a.pool_size, k, a.chunk, rows_per=30))
    out += [lcmd_case(2000, k, "float64"), lcmd_case(2000, k, "float32")]
    return out


# --------------------------------------------------------------------------------------------------
# correctness gate and timing
# --------------------------------------------------------------------------------------------------

def gate(case, device) -> dict:
    """Triton launcher vs reference on the same inputs (relative error of the outputs); raises nothing."""
    import torch
    t = case["make"](device)
    if case.get("inplace"):
        t2 = dict(t, dmin2=t["d0"].clone(), owner=t["owner"].clone())
        t["dmin2"], t["owner"] = t["d0"].clone(), torch.zeros_like(t["owner"])
        d_ref, o_ref = case["ref"](t)
        d_tri, o_tri = case["tri"](t2)
        err = float((d_ref - d_tri).abs().max() / d_ref.abs().max().clamp_min(1e-30))
        owner_ok = bool((o_ref == o_tri).float().mean() >= 0.999)
        return {"rel_err": err, "owner_agree": owner_ok, "ok": err < 1e-4 and owner_ok}
    ref_fn = case.get("ref_one", case["ref"])
    tri_fn = case.get("tri_one", case["tri"])
    r = case["out"](ref_fn(t)).double()
    y = case["out"](tri_fn(t)).double()
    err = _rel_err(r, y)
    return {"rel_err": err, "ok": bool(torch.isfinite(y).all()) and err < GATE}


def _rel_err(r, y) -> float:
    """‖r − y‖ / ‖r‖ (relative RMS error of y against the reference r)."""
    return float((r - y).norm() / r.norm().clamp_min(1e-30))


def time_cpu(case, repeat) -> dict:
    t = case["make"]("cpu")
    res = utils.timeit(lambda: case["ref"](t), repeat=repeat, warmup=1)
    return res


def time_gpu(case) -> dict:
    import torch
    t = case["make"]("cuda")
    out = {}
    g = gate(case, "cuda")
    out["gate"] = g
    if not g["ok"]:
        out["error"] = "correctness gate failed: Triton not timed"
        return out
    out["triton"] = utils.do_bench_ms(lambda: case["tri"](t))
    out["reference"] = utils.do_bench_ms(lambda: case["ref"](t))
    if case["gemm"] is not None:
        old = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = False
            out["cublas_gemm_fp32"] = utils.do_bench_ms(lambda: case["gemm"](t))
            torch.backends.cuda.matmul.allow_tf32 = True
            out["cublas_gemm_tf32"] = utils.do_bench_ms(lambda: case["gemm"](t))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    if case.get("variants"):
        out["variants"] = time_variants(case, t, utils.do_bench_ms)
    return out


def time_variants(case, t, bench) -> dict:
    """Per variant: its relative error against the reference on inputs `t` and, within the gate, the median ms
    that `bench` (triton.testing.do_bench on a GPU) gives its whole-pool loop; an error message where it fails."""
    r = case["out"](case["ref_one"](t)).double()
    out = {}
    for name, one in case["variants"].items():
        try:
            err = _rel_err(r, case["out"](one(t)).double())
            ms = bench(lambda: case["variant_loop"](one)(t))["median_ms"] if err < GATE else None
            out[name] = {"rel_err": err, "median_ms": ms}
        except Exception as e:  # a tile the card cannot hold (shared memory) is a result, not a crash
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    return out


def fastest_accurate(variants: dict, tol: float = 1e-5):
    """(name, entry) of the fastest timed variant with fp32-level error (≤ tol), or None."""
    ok = {n: v for n, v in variants.items() if v.get("median_ms") and v["rel_err"] <= tol}
    return min(ok.items(), key=lambda kv: kv[1]["median_ms"]) if ok else None


def add_args(p: argparse.ArgumentParser):
    p.add_argument("--pool-size", type=int, default=200_000, help="rows streamed through segment_quadform")
    p.add_argument("--sketch-dim", type=int, default=512, help="k (default 512)")
    p.add_argument("--chunk", type=int, default=8192, help="rows per segment_quadform chunk (default 8192)")
    p.add_argument("--repeat", type=int, default=5, help="CPU timing repeats (median)")


def run(a, argv) -> dict:
    import torch
    gpu = torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET")
    rows = []
    for c in cases(a):
        row = {"op": c["op"], "shape": c["shape"], "gflop": c["flops"] / 1e9}
        cpu = time_cpu(c, a.repeat)
        row["cpu_ref_ms"] = 1e3 * cpu["median_s"]
        row["cpu_ref_gflops"] = c["flops"] / cpu["median_s"] / 1e9
        row["cpu_ref_gbs"] = c["bytes"] / cpu["median_s"] / 1e9
        if gpu:
            g = time_gpu(c)
            row["gpu"] = g
            row["gate_rel_err"] = g["gate"]["rel_err"]
            if "triton" in g:
                tri, ref_ms = g["triton"]["median_ms"], g["reference"]["median_ms"]
                row["triton_ms"], row["gpu_ref_ms"] = tri, ref_ms
                row["ref_over_triton"] = ref_ms / tri
                row["triton_tflops"] = c["flops"] / (tri * 1e-3) / 1e12
                row["triton_gbs"] = c["bytes"] / (tri * 1e-3) / 1e9
                if "cublas_gemm_fp32" in g:
                    row["gemm_fp32_ms"] = g["cublas_gemm_fp32"]["median_ms"]
                    row["triton_over_gemm"] = tri / row["gemm_fp32_ms"]
                best = fastest_accurate(g.get("variants", {}))
                if best:
                    name, v = best
                    row["best_variant"] = f"{name}: {v['median_ms']:.3g} ms, rel err {v['rel_err']:.1e}"
                    row["ref_over_best_variant"] = ref_ms / v["median_ms"]
            else:
                row["triton_ms"] = g.get("error")
        else:
            row["triton_ms"] = "skipped: no GPU"
        rows.append(row)
    return utils.record("kernels", argv, rows, gpu_timed=gpu,
                        settings={"pool_size": a.pool_size, "sketch_dim": a.sketch_dim, "chunk": a.chunk,
                                  "repeat": a.repeat})


COLUMNS = ["op", "shape", "gflop", "cpu_ref_ms", "cpu_ref_gflops", "cpu_ref_gbs", "triton_ms", "gpu_ref_ms",
           "ref_over_triton", "triton_tflops", "triton_gbs", "gemm_fp32_ms", "triton_over_gemm", "gate_rel_err",
           "best_variant", "ref_over_best_variant"]
HEADERS = ["op", "shape", "GFLOP", "CPU ref ms", "CPU ref GFLOP/s", "CPU ref GB/s", "Triton ms", "GPU ref ms",
           "ref/Triton", "Triton TFLOP/s", "Triton GB/s", "cuBLAS GEMM ms", "Triton/GEMM", "gate rel err",
           "fastest fp32-accurate variant", "ref/that variant"]


def table(doc) -> str:
    note = "" if doc["gpu_timed"] else "\nTriton: skipped: no GPU (the interpreter is never timed).\n"
    return utils.header(doc) + note + "\n" + utils.markdown_table(doc["results"], COLUMNS, HEADERS)
