"""Does the feature-space posterior see where the model's own MD goes wrong? `python -m bench.md_novelty`.

The shipped oc20 model runs Langevin MD (bench/bench_md.py's set-up: 800 K, bottom layer fixed) from test_id
frames; every frame is labelled with EMT afterwards. Per frame: the real RMS force error (meV/Å) and energy error
(meV/atom), and, for the embedding and energy kernels fitted on the train split + a pretraining sample (ntkal.fit
as `ntkal fit --pretrain` does), the posterior-variance score and the calibrated energy error. For the joint kernel
(fitted alike; the Calculator's 8 probe rows per frame) the written force error and what it is made of, per force
row: ‖g‖² (the feature's size), PV = ‖L⁻¹g‖², PV/‖g‖² (how unknown its direction is) and μ² (the predicted
residual's square); beside them the RMS of the model's and of EMT's forces. Per-atom scores (AtomNovelty): how far
each atom's invariant embedding is from the labelled atoms' (a per-atom linear-posterior variance and the distance to
the nearest labelled atom of its element), max over the frame's atoms, and the frame's shortest interatomic distance.
Prints the Spearman of each against the real errors, within each run (the MD's time course) and over all frames,
and how each moved from a run's first to its last frame.
"""
from __future__ import annotations

import argparse
import sys
import time

import mace  # noqa: F401  (before e3nn: docs/design.md, Imports)
import numpy as np
import torch

KERNELS = ("embedding", "energy")
# per-atom scores (AtomNovelty), max over a frame's atoms; and the frame's shortest interatomic distance (Å)
ATOM_SCORES = ("atom_pv_max", "atom_nn_max", "min_distance")
# the same split by the atoms' kind: adsorbate (H, C, N, O) and metal atoms; real_f_* = RMS force error over them
ADSORBATE_SCORES = ("real_f_ads", "real_f_metal", "atom_pv_ads", "atom_nn_ads")
# the joint kernel's force rows per frame (FORCE_PARTS) and the forces' sizes, followed from first to last frame
FORCE_PARTS = ("joint_force_error", "force_row_norm2", "force_row_pv", "force_row_novelty", "force_row_mu2")
DRIFT = ("real_f",) + FORCE_PARTS + ("model_force_rms", "emt_force_rms") + ATOM_SCORES + ADSORBATE_SCORES


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.md_novelty", description=__doc__.splitlines()[0])
    ap.add_argument("--starts", default="test_id:4", help="split:count of MD starts (bench_md.md_starts)")
    ap.add_argument("--md-steps", type=int, default=30)
    ap.add_argument("--temperature", type=float, default=800.0)
    ap.add_argument("--pretrain-size", type=int, default=100)
    ap.add_argument("--sketch-dim", type=int, default=512)
    ap.add_argument("--probes", type=int, default=8, help="the joint kernel's probe rows per frame (the Calculator's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import ntkal
    from ntkal.acquisition.scorers import ErrorScorer

    from . import bench_md as bm
    from . import utils
    files, train, pre = bm.oc20_sets(a.pretrain_size)
    fits = {}
    for kernel in KERNELS:
        fz = ntkal.MACEFeaturizer(str(files["model"]), kernel=kernel, sketch_dim=a.sketch_dim, dtype=torch.float64)
        fits[kernel] = (fz, ErrorScorer(ntkal.fit(fz, train, pretrain=pre or None)))
    fz_joint = bm.featurizer(files["model"], "joint", a.sketch_dim, "float64")
    post_joint = ntkal.fit(fz_joint, train, pretrain=pre or None)
    joint = (fz_joint.with_kernel("joint", a.probes), post_joint)
    plain = bm.plain_calculator(files["model"])
    atom_novelty = AtomNovelty(fits["embedding"][0], train + pre)
    frames = []
    t0 = time.perf_counter()
    for si, s in enumerate(bm.md_starts(a.starts)):
        atoms = bm.fix_bottom_layer(s.copy())
        atoms.calc = plain
        dyn = bm.langevin(atoms, a.temperature, 1.0, seed=100 + si)
        for t in range(a.md_steps + 1):
            forces = atoms.get_forces(apply_constraint=False)
            lab = bm.emt_label(atoms)
            diff2 = (lab.arrays["REF_forces"] - forces) ** 2
            ads = atoms.numbers < 10
            fr = {"run": si, "t": t, "real_f": 1e3 * float(np.sqrt(np.mean(diff2))),
                  "real_f_ads": 1e3 * float(np.sqrt(np.mean(diff2[ads]))),
                  "real_f_metal": 1e3 * float(np.sqrt(np.mean(diff2[~ads]))),
                  "real_e": 1e3 * abs(lab.info["REF_energy"] - atoms.get_potential_energy()) / len(atoms)}
            for kernel, (fz, scorer) in fits.items():
                sc = scorer(fz([atoms]))
                fr[f"{kernel}_pv"] = float(sc.values["pv"][0])
                fr[f"{kernel}_energy_error"] = float(sc.values["energy_error"][0])
            fr.update(force_parts(*joint, atoms))
            fr.update(atom_novelty(atoms))
            fr["model_force_rms"] = 1e3 * float(np.sqrt(np.mean(forces ** 2)))
            fr["emt_force_rms"] = 1e3 * float(np.sqrt(np.mean(lab.arrays["REF_forces"] ** 2)))
            frames.append(fr)
            if t < a.md_steps:
                dyn.step()
    summary = spearmans(frames)
    moved = drift(frames)
    doc = utils.record("md_novelty", sys.argv[1:] if argv is None else argv,
                       [{"summary": summary, "drift": moved, "frames": frames}],
                       prog="python -m bench.md_novelty", n_train=len(train), n_pretrain=len(pre),
                       wall_s=time.perf_counter() - t0)
    print(table(summary))
    print(utils.markdown_table(moved, ["quantity", "rose in runs", "median last / first"]))
    if a.json:
        utils.write_json(a.json, doc)
    return 0


def spearmans(frames) -> list:
    """Per score and real error: Spearman over all frames, and the median of the per-run values."""
    from scipy.stats import spearmanr
    runs = sorted({f["run"] for f in frames})
    out = []
    for key in ([f"{k}_{v}" for k in KERNELS for v in ("pv", "energy_error")] + list(FORCE_PARTS) + list(ATOM_SCORES)
                + ["atom_pv_ads", "atom_nn_ads"]):
        row = {"score": key}
        for real in ("real_f", "real_e", "real_f_ads"):
            row[f"{real} all"] = float(spearmanr([f[key] for f in frames], [f[real] for f in frames])[0])
            per = [float(spearmanr([f[key] for f in frames if f["run"] == r], [f[real] for f in frames
                                                                             if f["run"] == r])[0]) for r in runs]
            row[f"{real} per run"] = per
            row[f"{real} median per run"] = float(np.median(per))
        out.append(row)
    return out


def force_parts(fz, post, atoms) -> dict:
    """The joint kernel's written force error of one frame (ErrorScorer's force_error, from the same predictive)
    and the means over its force rows of ‖g‖², PV, PV/‖g‖² and μ² (ntkal/posterior/residual.py, Predictive)."""
    from ntkal.features.rowblock import FORCE
    rows = fz([atoms])
    pred = post.predictive(rows)
    f = (rows.kind == FORCE).numpy()
    norm2 = rows.rows.detach().to(torch.float64).square().sum(1).cpu().numpy()[f]
    pv = pred.row_pv.numpy()[f]
    return {"joint_force_error": 1e3 * float(post.residual.errors(rows, pred)["force"][0]),
            "force_row_norm2": float(norm2.mean()), "force_row_pv": float(pv.mean()),
            "force_row_novelty": float((pv / norm2).mean()), "force_row_mu2": float((pred.mu.numpy()[f] ** 2).mean())}


def atom_embeddings(fz, atoms_list) -> torch.Tensor:
    """Each atom's invariant node features (MACEFeaturizer.atom_invariants), atoms in order, float64."""
    return torch.cat([fz.atom_invariants(fz.batch(atoms_list[i:i + 16]))
                      for i in range(0, len(atoms_list), 16)]).to(torch.float64)


class AtomNovelty:
    """Per-atom novelty against the labelled atoms, in their standardised invariant embeddings: a linear posterior's
    variance h^T (H^T H + λI)^-1 h (λ = 1e-3 of the mean eigenvalue) and the distance to the nearest labelled atom
    of the same element; each the max over a frame's atoms and over its adsorbate atoms (H, C, N, O)."""

    def __init__(self, fz, labelled):
        self.fz = fz
        h = atom_embeddings(fz, labelled)
        self.mean, self.std = h.mean(0), h.std(0).clamp_min(1e-8)
        h = (h - self.mean) / self.std
        gram = h.T @ h
        lam = 1e-3 * float(torch.trace(gram)) / gram.shape[0]
        self.chol = torch.linalg.cholesky(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype))
        z = np.concatenate([a.numbers for a in labelled])
        self.by_z = {int(e): h[torch.from_numpy(z == e)] for e in np.unique(z)}

    def __call__(self, atoms) -> dict:
        h = (atom_embeddings(self.fz, [atoms]) - self.mean) / self.std
        pv = torch.linalg.solve_triangular(self.chol, h.T, upper=False).square().sum(0)
        nn = [float(torch.cdist(h[i:i + 1], self.by_z[int(z)]).min()) for i, z in enumerate(atoms.numbers)]
        d = atoms.get_all_distances(mic=True)
        ads = atoms.numbers < 10
        return {"atom_pv_max": float(pv.max()), "atom_nn_max": max(nn),
                "min_distance": float(d[np.triu_indices(len(atoms), 1)].min()),
                "atom_pv_ads": float(pv[torch.from_numpy(ads)].max()), "atom_nn_ads": max(np.asarray(nn)[ads])}


def drift(frames) -> list:
    """Per quantity of DRIFT: in how many runs its last frame is above its first, and the median last / first."""
    runs = sorted({f["run"] for f in frames})
    out = []
    for key in DRIFT:
        pairs = [(fs[0][key], fs[-1][key]) for fs in ([f for f in frames if f["run"] == r] for r in runs)]
        out.append({"quantity": key, "rose in runs": f"{sum(b > a for a, b in pairs)} of {len(pairs)}",
                    "median last / first": float(np.median([b / a for a, b in pairs]))})
    return out


def table(summary) -> str:
    from .utils import markdown_table
    return markdown_table(summary, ["score", "real_f all", "real_f median per run", "real_e all",
                                    "real_e median per run", "real_f_ads all", "real_f_ads median per run"])


if __name__ == "__main__":
    raise SystemExit(main())
