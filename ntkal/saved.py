"""A saved posterior (docs/design.md, "Saved posterior"): everything a scorer needs, written once by
`ntkal fit --out state.ntkal` (or `ntkal.fit(..., out=...)`) and used by `score`, `select`, `evaluate`
(`--posterior`) instead of fitting again.

The file is plain state (ntkal.runstate.state_to_bytes: safetensors with the structure as JSON in its
metadata; nothing is unpickled) holding the Posterior's and the LCMD centres' to_state(), the score, the
featurizer settings the rows must match, a hash of the model's weights, the fit's options and where it came
from, sealed by a SHA-256 of the canonical payload stored in the file: a cut, edited or foreign file is
refused with one line. Above ntkal.acquisition, below ntkal.api and ntkal.cli.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from .errors import InputError, NtkalError
from .options import flag

FORMAT = "ntkal.saved-posterior/1"
SUFFIX = ".ntkal"
FEATURES = ("kernel", "sketch_dim", "params", "seed", "head", "dtype")  # what pool rows must be made with
# options the fit fixed: the features and the posterior's (score is apart: pv can always be asked for)
FIXED = FEATURES + ("sigma_e2", "sigma_f2", "force_reduce", "train_force_probes")


@dataclass
class SavedPosterior:
    """A fitted posterior with what scoring it needs (see the module docstring)."""

    posterior: object      # ntkal.posterior.Posterior
    centres: object        # ntkal.acquisition.centres.Centres: LCMD's labelled centres
    score: str             # "error" or "pv", as Pipeline.fit resolved it
    features: dict         # kernel, sketch_dim, params, seed, head, dtype of the rows it was fitted on
    model_hash: str        # model_hash() of the model it was fitted with
    options: dict          # Options.key() of the fit
    provenance: dict       # ntkal version, inputs (paths + sha256), date

    def check(self, fz, what: str = "--posterior"):
        """InputError (one line) unless featurizer `fz` makes the rows this posterior was fitted on: the same
        model weights and the same kernel, sketch, parameters, seed, head and dtype."""
        theirs = model_hash(fz.model)
        if theirs != self.model_hash:
            raise InputError(f"{what}: made for another model (weights hash {self.model_hash[:12]}…, --model has "
                             f"{theirs[:12]}…); fit it again with this model")
        settings = fz.settings()
        _compare(self.features, {k: settings[k] for k in FEATURES}, what)

    def to_state(self) -> dict:
        return {"posterior": self.posterior.to_state(), "centres": self.centres.to_state(), "score": self.score,
                "features": dict(self.features), "model_hash": self.model_hash, "options": dict(self.options),
                "provenance": dict(self.provenance)}

    @classmethod
    def from_state(cls, state: dict) -> "SavedPosterior":
        from .acquisition.centres import Centres
        from .posterior import Posterior
        if state["score"] not in ("error", "pv") or not isinstance(state["model_hash"], str):
            raise ValueError(f"bad score {state['score']!r} or model hash")
        return cls(Posterior.from_state(state["posterior"]), Centres.from_state(state["centres"]), state["score"],
                   {k: state["features"][k] for k in FEATURES}, state["model_hash"], dict(state["options"]),
                   dict(state["provenance"]))


def _compare(saved: dict, given: dict, what: str):
    """InputError naming the first option whose given value is not the saved one."""
    for key, value in given.items():
        if value is not None and key in saved and value != saved[key]:
            raise InputError(f"{flag(key)} {value}: {what} was fitted with {flag(key)} {saved[key]}; "
                             f"fit it again or leave {flag(key)} out")


# --------------------------------------------------------------------------------------------
# the model's identity

def model_hash(model) -> str:
    """SHA-256 over the model's state_dict: every name, dtype, shape and the bytes, in name order. Floating
    tensors are hashed in float32 on the CPU, so a .model path, the loaded nn.Module and a featurizer's copy in
    float64 (float32 -> float64 -> float32 is exact) give the same hash."""
    import torch
    from .features.mace import load_model
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu")
        t = (t.float() if t.is_floating_point() else t).contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# building, saving and loading

def build(pipe, post, inputs: Optional[dict] = None) -> SavedPosterior:
    """The SavedPosterior of a Pipeline that has just fitted `post` (its featurizer, centres and score).
    inputs: {name: path or anything else} of the fit (paths are recorded with a SHA-256 of their content)."""
    import datetime
    from . import __version__
    from .provenance import versions
    from .runstate import file_fingerprint
    fz, opts = pipe.fz, pipe.opts.key()
    settings = fz.settings()
    features = {k: settings[k] for k in FEATURES}
    opts.update(features, force_probes=fz.force_probes)  # a featurizer given to ntkal.fit sets these itself
    files = {name: file_fingerprint(v) if isinstance(v, (str, os.PathLike)) else {"given": type(v).__name__}
             for name, v in (inputs or {}).items() if v is not None}
    provenance = {"ntkal": __version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "inputs": files, "versions": versions()}
    return SavedPosterior(post, pipe.centres, pipe.score, features, model_hash(fz.model), opts, provenance)


def save(path, saved: SavedPosterior, inputs: Iterable = ()) -> Path:
    """Write `saved` to `path` (name ending in .ntkal) atomically; never over an input or over a file ntkal did
    not write (ntkal.io.atomic_output, ntkal.runstate.claim)."""
    from . import __version__
    from .io import atomic_output
    from .runstate import state_to_bytes
    inputs = [p for p in inputs if isinstance(p, (str, os.PathLike))]
    path = check_out(path, inputs)
    payload = saved.to_state()
    data = state_to_bytes({"format": FORMAT, "written_by": f"ntkal {__version__}", "digest": digest(payload),
                           "payload": payload})
    with atomic_output(path, inputs) as tmp:
        tmp.write_bytes(data)
    return path


def check_out(path, inputs: Iterable = ()) -> Path:
    """InputError unless `path` can take a saved posterior: a name ending in .ntkal, not an input, in an existing
    folder, and not a file ntkal did not write. Run before fitting, and again by save()."""
    from .io import check_output_path
    from .runstate import claim
    path = Path(path).expanduser()
    if not path.name.endswith(SUFFIX):
        raise InputError(f"--out: a saved posterior's name ends in {SUFFIX}, got {path.name!r}")
    try:
        check_output_path(path, inputs)
    except InputError as exc:
        raise InputError(f"--out: {exc}") from None
    return claim(path, "--out")


def load(path, model=None, what: str = "--posterior", **features) -> SavedPosterior:
    """The SavedPosterior in `path`, checked: InputError (one line) if it is not one (or not readable), if its
    content does not match its digest (cut short, edited), or if it was made for another `model` (a .model path,
    nn.Module or MACEFeaturizer; weights hash) or other features (kernel=, sketch_dim=, params=, seed=, head=,
    dtype=; those given are compared). Nothing is unpickled."""
    from .runstate import state_from_bytes
    unknown = sorted(set(features) - set(FEATURES))
    if unknown:
        raise TypeError(f"load() got an unexpected keyword argument {unknown[0]!r}")
    path = Path(path).expanduser()
    where = f"{what} {path}"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    try:
        state = state_from_bytes(data)
    except ValueError:
        raise InputError(f"{where}: not a saved posterior, or cut short (not a readable ntkal state file)") from None
    found = state.get("format") if isinstance(state, dict) else None
    if found != FORMAT:
        if isinstance(found, str) and found.startswith(FORMAT.split("/")[0] + "/"):
            raise InputError(f"{where}: format {found!r}; this ntkal reads {FORMAT!r}")
        raise InputError(f"{where}: not a saved posterior (an ntkal state of another kind)")
    payload = state.get("payload")
    if not isinstance(payload, dict) or state.get("digest") != digest(payload):
        raise InputError(f"{where}: corrupted: its content does not match the digest stored in it (edited or damaged)")
    try:
        saved = SavedPosterior.from_state(payload)
    except (KeyError, TypeError, ValueError, AttributeError, NtkalError) as exc:
        raise InputError(f"{where}: corrupted or incomplete ({type(exc).__name__}: {exc})") from None
    if model is not None:
        if hasattr(model, "settings") and hasattr(model, "model"):  # a MACEFeaturizer: weights and features
            saved.check(model, where)
        else:
            theirs = model_hash(model)
            if theirs != saved.model_hash:
                raise InputError(f"{where}: made for another model (weights hash {saved.model_hash[:12]}…, "
                                 f"--model has {theirs[:12]}…); fit it again with this model")
    _compare(saved.features, features, where)
    return saved


def digest(payload) -> str:
    """SHA-256 of the canonical payload: its structure as sorted JSON (tensors and arrays stand as their dtype
    and shape) and every tensor's bytes in that order. Independent of the safetensors layout."""
    import numpy as np
    import torch
    h = hashlib.sha256()

    def canonical(x):
        if isinstance(x, (torch.Tensor, np.ndarray)):
            t = torch.as_tensor(x).detach().to("cpu").contiguous()
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            return {"tensor": str(t.dtype), "shape": list(t.shape)}
        if isinstance(x, dict):
            return {str(k): canonical(x[k]) for k in sorted(x)}
        if isinstance(x, (list, tuple)):
            return [canonical(v) for v in x]
        return x.item() if isinstance(x, np.generic) else x
    skeleton = json.dumps(canonical(payload), sort_keys=True, allow_nan=True)
    h.update(skeleton.encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# using it

def options_for(saved: SavedPosterior, options: dict, given: Iterable[str], what: str = "--posterior") -> dict:
    """`options` (Options fields) with what the fit fixed taken from `saved`: a fixed option in `given` (set by
    the user) with another value is an InputError naming its flag. --score pv may be asked of an error-score
    posterior; --score error needs one fitted with labelled residuals."""
    given = set(given)
    out = dict(options)
    _compare({k: saved.options[k] for k in FIXED if k in saved.options},
             {k: options[k] for k in FIXED if k in given and k in options}, what)
    out.update({k: saved.options[k] for k in FIXED if k in saved.options})
    score = options.get("score") if "score" in given else None
    if score == "error" and saved.posterior.residual is None:
        raise InputError(f"--score error: {what} was fitted without labelled residuals (score pv)")
    out["score"] = score or saved.score
    return out


def resolve(posterior, options: dict, train=None, pretrain=None):
    """(keyword options, SavedPosterior or None) of a Python entry point: without `posterior`, `options` as
    given; with one (a path or a SavedPosterior), the options its fit fixed taken from it (options_for), and
    train / pretrain refused (the posterior holds what they would fit)."""
    import dataclasses
    from .options import Options
    if posterior is None:
        return options, None
    if train is not None or pretrain is not None:
        raise InputError("give train (and pretrain) or posterior, not both: the posterior holds what they fit")
    saved = as_saved(posterior)
    Options.from_kwargs(**options)  # unknown names are a TypeError, as without a posterior
    return options_for(saved, {**dataclasses.asdict(Options()), **options}, options), saved


def featurizer(saved: SavedPosterior, model, **overrides):
    """The MACEFeaturizer the state was fitted with (same kernel, sketch, parameters, seed, head, dtype) on
    `model`, checked against the state's weights hash; overrides: force_probes, device, impl, memory_gb, … (a
    feature setting in them must equal the state's)."""
    import torch
    from .features import MACEFeaturizer
    _compare(saved.features, {k: v for k, v in overrides.items() if k in FEATURES and k != "dtype"}, "the posterior")
    if "dtype" in overrides and str(overrides["dtype"]).replace("torch.", "") != saved.features["dtype"]:
        raise InputError(f"--dtype {overrides['dtype']}: the posterior was fitted with --dtype {saved.features['dtype']}")
    kwargs = {**{k: v for k, v in saved.features.items() if k != "dtype"},
              "dtype": getattr(torch, saved.features["dtype"]),
              **{k: v for k, v in overrides.items() if k not in FEATURES}}
    fz = MACEFeaturizer(model, **kwargs)
    saved.check(fz)
    return fz


def as_saved(posterior, model=None) -> SavedPosterior:
    """A SavedPosterior as given, or loaded (and checked against `model`) from a path."""
    if isinstance(posterior, SavedPosterior):
        return posterior
    if isinstance(posterior, (str, os.PathLike)):
        return load(posterior, model=model)
    raise TypeError(f"posterior must be a path or a SavedPosterior, not {type(posterior).__name__}")
