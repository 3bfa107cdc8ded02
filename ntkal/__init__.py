"""ntkal: force-aware neural-tangent-kernel active learning for MACE interatomic potentials.

Features from one pretrained model (embeddings, energy NTK, force NTK, joint), a feature-space
posterior built from the training set, posterior-variance scores streamed over the pool, and LCMD
batch selection from a PV shortlist. See DESIGN §7 for the public API.
"""
__version__ = "0.1.0"

from .errors import InputError, ModelError, NtkalError
from .features import EMBEDDING, ENERGY, FORCE, MACEFeaturizer, RowBlock
from .posterior import Posterior
from .select import SelectionResult, lcmd, select_rows

__all__ = ["MACEFeaturizer", "RowBlock", "ENERGY", "FORCE", "EMBEDDING", "Posterior", "select",
           "select_rows", "score", "lcmd", "SelectionResult", "NtkalError", "InputError", "ModelError",
           "__version__"]


def __getattr__(name):  # the structure-level API pulls in io and tqdm only when used
    if name in ("select", "score"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'ntkal' has no attribute {name!r}")
