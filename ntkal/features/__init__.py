"""Feature maps: from a MACE model and structures to ragged rows of sketched NTK / embedding features."""
from .mace import KERNELS, MACEFeaturizer, load_model
from .rowblock import EMBEDDING, ENERGY, FORCE, KIND_NAMES, RowBlock
from .sketch import Block, Sketch, parameter_blocks

__all__ = ["MACEFeaturizer", "load_model", "KERNELS", "RowBlock", "ENERGY", "FORCE", "EMBEDDING",
           "KIND_NAMES", "Sketch", "Block", "parameter_blocks"]
