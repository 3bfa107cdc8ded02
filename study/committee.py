"""The committee baseline: members fine-tuned from the pretrained model with different seeds.

Score of a structure = its per-atom energy variance over the members / c_E + its mean force-component
variance / c_F, where c_E, c_F are the means of the two terms over the labelled set (so each part
averages 1 there, the convention the posterior's per-kind scales use (docs/design.md, Posterior)). Batch: top-M shortlist by score,
then LCMD (TP mode) on the member-deviation vector

  psi(x) = [ (E_m(x) - mean E(x)) / N / sqrt(c_E),  rms_atoms,xyz(F_m(x) - mean F(x)) / sqrt(c_F) ]_m / sqrt(M)

whose squared norm is exactly the score: the committee's own "ensemble kernel" distance, with the
labelled structures as TP centres, as the NTK methods use their feature vectors.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch

from ntkal import EMBEDDING, RowBlock, select_rows
from ntkal.acquisition.scorers import CommitteeScorer

from .metrics import predictor


def member_predictions(model_paths: Sequence, structures: Sequence, batch_size: int = 32):
    """[(energies [n], forces list)] per member."""
    # float32 predictions agree to 0.01 meV here and cost less
    return [predictor(path, "float32", batch_size).predict(structures) for path in model_paths]


def disagreement(preds, natoms) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(per-atom energy variance [n], mean force-component variance [n], energy deviations [n, M],
    rms force deviations [n, M]) from member predictions (population variance over the M members)."""
    n_at = np.asarray(natoms, dtype=np.float64)
    e = np.stack([p[0] for p in preds], axis=1) / n_at[:, None]            # [n, M] eV/atom
    de = e - e.mean(axis=1, keepdims=True)
    var_e = (de ** 2).mean(axis=1)
    n = len(n_at)
    m = len(preds)
    var_f = np.zeros(n)
    rms_f = np.zeros((n, m))
    for i in range(n):
        f = np.stack([p[1][i] for p in preds])                             # [M, N_i, 3]
        df = f - f.mean(axis=0, keepdims=True)
        var_f[i] = (df ** 2).mean()
        rms_f[i] = np.sqrt((df ** 2).reshape(m, -1).mean(axis=1))
    return var_e, var_f, de, rms_f


def scores_and_psi(preds, natoms, scale_e: float, scale_f: float):
    """(score [n], psi [n, 2M]) with ||psi||^2 == score."""
    var_e, var_f, de, rms_f = disagreement(preds, natoms)
    m = de.shape[1]
    score = var_e / scale_e + var_f / scale_f
    psi = np.concatenate([de / np.sqrt(scale_e), rms_f / np.sqrt(scale_f)], axis=1) / np.sqrt(m)
    return score, psi


def committee_select(member_paths: Sequence, labelled: Sequence, pool: Sequence, budget: int, seed: int,
                     shortlist=None, batch_size: int = 32):
    """Positions into `pool` in pick order, and an info dict (scales, shortlist size, status)."""
    pl = member_predictions(member_paths, list(labelled), batch_size)
    pp = member_predictions(member_paths, list(pool), batch_size)
    var_e_l, var_f_l, _, _ = disagreement(pl, [len(a) for a in labelled])
    scale_e = float(var_e_l.mean()) if var_e_l.mean() > 0 else 1.0
    scale_f = float(var_f_l.mean()) if var_f_l.mean() > 0 else 1.0
    s_lab, psi_lab = scores_and_psi(pl, [len(a) for a in labelled], scale_e, scale_f)
    s_pool, psi_pool = scores_and_psi(pp, [len(a) for a in pool], scale_e, scale_f)
    res = select_rows(_rows(psi_lab), _rows(psi_pool), budget, shortlist=shortlist, seed=seed,
                      scorer=CommitteeScorer())
    positions = res.indices
    info = {"scale_e": scale_e, "scale_f": scale_f, "shortlist_size": int(len(res.shortlist)), "status": res.status,
            "mean_score_labelled": float(s_lab.mean()), "mean_score_pool": float(s_pool.mean()),
            "scores": [float(s_pool[i]) for i in positions], "pool_scores": s_pool.tolist()}
    return np.asarray(positions, dtype=np.int64), info


def _rows(psi: np.ndarray) -> RowBlock:
    """One row per structure: the member-deviation vector (also its LCMD vector)."""
    t = torch.from_numpy(psi)
    n = t.shape[0]
    return RowBlock(t, torch.arange(n + 1), torch.full((n,), EMBEDDING, dtype=torch.int8),
                    torch.ones(n, dtype=torch.int64), psi=t)


def member_seeds(seed: int, size: int) -> List[int]:
    """Member 0 uses the study seed: it is the same fine-tune every method evaluates on that labelled set."""
    return [seed + 1000 * j for j in range(size)]
