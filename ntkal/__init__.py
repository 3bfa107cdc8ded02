"""ntkal: force-aware neural-tangent-kernel active learning for MACE interatomic potentials.

Features from one pretrained model (embeddings, energy NTK, force NTK, joint), a feature-space
posterior from the labelled set, the pool scored in chunks, and a diverse batch picked from the
shortlist (docs/design.md). Names are imported on first use, so `import ntkal` (and the CLI's
option checks) do not load torch or mace.
"""
__version__ = "0.1.0"

_NAMES = {
    "select": "api", "score": "api", "fit": "api", "select_rows": "api", "evaluate": "evaluate",
    "MACEFeaturizer": "features", "RowBlock": "features", "ENERGY": "features", "FORCE": "features",
    "EMBEDDING": "features", "Posterior": "posterior", "SelectionResult": "acquisition.pipeline",
    "lcmd": "acquisition.selectors", "Options": "options",
    "NtkalError": "errors", "InputError": "errors", "ModelError": "errors", "Calculator": "calculator",
    "md": "dynamics",
    "load_posterior": "api", "SavedPosterior": "saved",
}
__all__ = sorted(_NAMES) + ["__version__"]


def __getattr__(name):
    if name in ("io", "data"):  # submodules, imported on first use
        import importlib
        return importlib.import_module(f".{name}", __name__)
    if name in _NAMES:
        import importlib
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'ntkal' has no attribute {name!r}")
