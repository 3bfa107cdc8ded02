"""ntkal.Calculator: an ASE calculator that gives a MACE model's energy, forces and stress and, at the same
step, the model's predicted error (docs/design.md, "During MD").

A drop-in where mace's MACECalculator goes. Energy, forces and stress come from the forward and first
backward the fast featurizer runs anyway (features/fast.py, rows_and_outputs), so a step with an error
costs one featurisation, not a model call plus a featurisation. The error values are ErrorScorer's, the
numbers `ntkal select` writes to extxyz: ntkal_energy_error (meV/atom), ntkal_force_error (meV/Å, RMS
over the 3N components) and, with exact force rows (force_probes=None), ntkal_atom_force_error per atom.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np
from ase.calculators.calculator import Calculator as _ASECalculator
from ase.calculators.calculator import all_changes

from .errors import InputError, NtkalError

log = logging.getLogger("ntkal")

ENERGY_ERROR, FORCE_ERROR, ATOM_FORCE_ERROR = "ntkal_energy_error", "ntkal_force_error", "ntkal_atom_force_error"
ERROR_AGE = "ntkal_error_age"  # calls since the error values were computed (0: this call's)
NO_RESIDUALS = ("the posterior has no residual model (it was fitted on structures without REF_energy/REF_forces "
                "labels), so it cannot predict the model's error: fit it on labelled structures")


class Calculator(_ASECalculator):
    """MACE energy, free_energy, forces, stress (3-D periodic cells) and the predicted error of each step.

    model: a MACE .model path or nn.Module; or a MACEFeaturizer (then `posterior` is the ntkal.Posterior
    fitted with it, e.g. ntkal.fit(fz, train), and its device, dtype and head are used).
    posterior: a saved posterior (the path `ntkal fit` writes, read by ntkal.saved.load), a SavedPosterior,
    or an ntkal.Posterior with a MACEFeaturizer as `model`; a saved posterior fixes the kernel, sketch, seed,
    head and dtype (the rows must be the fit's). It needs a residual model (labelled training
    structures): a posterior fitted on unlabelled structures is refused.
    force_probes: Rademacher probe rows per step for the force error (None: exact 3N rows, which also give
    ntkal_atom_force_error; cost grows with the atoms). error_every=k: the error is computed on every k-th
    call and held in between (results["ntkal_error_age"] says how many calls ago); the other calls are one
    plain model call. device: "cpu", "cuda" (None: cuda when available); dtype, head: None = the fit's.
    """

    def __init__(self, model, posterior, force_probes: Optional[int] = 8, error_every: int = 1,
                 device: Optional[str] = None, dtype=None, head: Optional[str] = None, **kwargs):
        super().__init__(**kwargs)
        if force_probes is not None and (isinstance(force_probes, bool) or not isinstance(force_probes, int)
                                         or force_probes < 1):
            raise InputError(f"force_probes must be a positive integer or None, got {force_probes!r}")
        if isinstance(error_every, bool) or not isinstance(error_every, int) or error_every < 1:
            raise InputError(f"error_every must be a positive integer, got {error_every!r}")
        self.error_every = error_every
        post, fz = _resolve(model, posterior, force_probes, device, dtype, head)
        if post.residual is None:
            raise NtkalError(NO_RESIDUALS)
        if post.k != fz.psi_dim:
            raise NtkalError(f"the posterior has width {post.k}, the featurizer {fz.psi_dim}: they come from "
                             "different settings (sketch_dim or kernel)")
        from .acquisition.scorers import ErrorScorer
        self.posterior, self.featurizer, self.scorer = post, fz, ErrorScorer(post)
        if fz.impl != "fast":
            log.warning("ntkal.Calculator: the fast featurizer is unavailable (%s); steps with an error run the "
                        "model twice", fz.fallback_reason or fz.kernel)
        kinds = set(post.kinds)
        errors = ([ENERGY_ERROR] if kinds & {"energy", "embedding"} else []) + \
                 ([FORCE_ERROR] if "force" in kinds and fz.kernel in ("force", "joint") else []) + \
                 ([ATOM_FORCE_ERROR] if fz.kernel in ("force", "joint") and fz.force_probes is None else [])
        self.error_names = errors
        self.implemented_properties = ["energy", "free_energy", "forces", "stress", *errors, ERROR_AGE]
        self._held: Optional[dict] = None  # the last error values
        self._age = 0
        self.n_calls = 0       # calculate() calls
        self.n_evaluated = 0   # of them, with the error computed

    # --- ASE ------------------------------------------------------------------------------------
    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        fz = self.featurizer
        if "numbers" in system_changes or self.n_calls == 0:
            fz.check_elements([atoms])
        stress = bool(np.all(atoms.pbc)) and atoms.cell.rank == 3
        due = self._held is None or self._age + 1 >= self.error_every
        if due and fz.impl == "fast":
            from .features.fast import rows_and_outputs
            rows, out = rows_and_outputs(fz, [atoms], stress)
        else:
            rows = fz([atoms]) if due else None
            out = self._plain(atoms, stress)
        self.n_calls += 1
        res = {"energy": float(out["energy"][0]), "forces": out["forces"].detach().double().cpu().numpy()}
        res["free_energy"] = res["energy"]
        if stress:
            from ase.stress import full_3x3_to_voigt_6_stress
            res["stress"] = full_3x3_to_voigt_6_stress(out["stress"][0].detach().double().cpu().numpy())
        if due:
            self._held, self._age = self._errors(rows), 0
            self.n_evaluated += 1
        else:
            self._age += 1
        res.update(self._held)
        res[ERROR_AGE] = self._age
        self.results = res

    def reset(self):
        """Clear the results and the held error values: the next call computes the error (a new trajectory)."""
        super().reset()
        self._held, self._age = None, 0

    def _plain(self, atoms, stress: bool) -> dict:
        """One model call (energy, forces, stress), as MACECalculator makes it."""
        fz = self.featurizer
        out = fz.model(fz.batch([atoms]), training=False, compute_force=True, compute_stress=stress)
        return {"energy": out["energy"].detach(), "forces": out["forces"], "stress": out["stress"] if stress else None}

    def _errors(self, rows) -> dict:
        """ErrorScorer's values of one structure's rows, under the extxyz names."""
        scored = self.scorer(rows)
        out = {}
        if "energy_error" in scored.values:
            out[ENERGY_ERROR] = float(scored.values["energy_error"][0])
        if "force_error" in scored.values:
            out[FORCE_ERROR] = float(scored.values["force_error"][0])
        atom = scored.atom_values.get("atom_force_error", [None])[0]
        if atom is not None:
            out[ATOM_FORCE_ERROR] = np.asarray(atom, dtype=np.float64)
        return out

    def close(self):
        """Remove the featurizer's hooks from the model."""
        self.featurizer.close()


def _resolve(model, posterior, force_probes, device, dtype, head):
    """(Posterior, MACEFeaturizer with this calculator's probes) from the constructor's arguments."""
    from .features import MACEFeaturizer
    from .posterior import Posterior
    if isinstance(model, MACEFeaturizer):
        if not isinstance(posterior, Posterior):
            raise InputError("with a MACEFeaturizer as the model, posterior must be the ntkal.Posterior fitted "
                             f"with it (ntkal.fit(fz, train)), got {type(posterior).__name__}")
        for name, value, have in (("device", device, str(model.device)), ("dtype", dtype, model.dtype),
                                  ("head", head, model.head)):
            if value is not None and _norm(value) != _norm(have):
                raise InputError(f"{name}={value!r} differs from the featurizer's ({have}); set it on the "
                                 "MACEFeaturizer")
        return posterior, _with_probes(model, force_probes)
    if isinstance(posterior, Posterior):
        raise InputError("an ntkal.Posterior needs the MACEFeaturizer it was fitted with as the model "
                         "(Calculator(fz, post)); or pass the path of a saved posterior")
    from . import saved
    if isinstance(posterior, (str, os.PathLike)):
        if not os.path.isfile(posterior):
            raise InputError("no such posterior file" if not os.path.exists(posterior) else
                             "posterior path is not a file", path=posterior)
        state = saved.load(posterior, model)
    elif isinstance(posterior, saved.SavedPosterior):
        state = posterior
    else:
        raise InputError(f"posterior must be a saved posterior's path, a SavedPosterior or an ntkal.Posterior, "
                         f"got {type(posterior).__name__}")
    import torch
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = {"device": device, "force_probes": force_probes}
    overrides.update({k: v for k, v in (("dtype", dtype), ("head", head)) if v is not None})
    fz = saved.featurizer(state, model, **overrides)  # the fit's kernel, sketch, seed, head and dtype
    return state.posterior, _with_probes(fz, force_probes)


def _with_probes(fz, force_probes):
    """The featurizer with `force_probes` probe rows (shares model, sketch and taps)."""
    if fz.kernel in ("force", "joint") and fz.force_probes != force_probes:
        return fz.with_kernel(fz.kernel, force_probes)
    return fz


def _norm(v) -> str:
    return str(v).replace("torch.", "")
