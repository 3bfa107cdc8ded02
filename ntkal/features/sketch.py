"""The deterministic parameter sketch S: P-dim parameter gradients -> k-dim features (docs/design.md, Features).

Every parameter tensor is cut into blocks. A block that is a weight of a linear map on per-row
vectors (e3nn Linear instruction blocks, tensor-product paths, radial-MLP layers, nn.Linear,
symmetric-contraction weights) is sketched with a tensor sketch over its factors (d_1, ..., d_r):
TS(G) = sum_{a_1..a_r} G[a_1..a_r] * F_1[a_1] * ... * F_r[a_r] / sqrt(k), F_j standard Gaussian
[d_j, k]; for r = 2 and G = sum_i x_i dy_i^T this is sum_i (x_i F_1) * (dy_i F_2) / sqrt(k), the
per-atom Jacobian projection. Every other tensor gets a dense Gaussian projection / sqrt(k).
E<S g, S g'> = <g, g'>, so sketched features reproduce the NTK in expectation. The factors depend
only on (seed, parameter name, block, factor), are drawn on the CPU in float64, and are therefore
identical across processes, devices and train/pool calls.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from ..options import PARAM_SETS

# Block.layer: the layout _module_blocks gives a parameter. The fast path's rules name the layouts they rely
# on (rules.Rule.layouts), so a rule never meets a parameter this chain laid out otherwise.
E3NN_LINEAR, TENSOR_PRODUCT, MLP_LAYER = "e3nn.Linear", "e3nn.TensorProduct", "e3nn.FullyConnectedNet"
NN_LINEAR, CONTRACTION, DENSE = "nn.Linear", "SymmetricContraction", "dense"


@dataclass(frozen=True)
class Block:
    """A slice [offset, offset + prod(shape)) of the flattened parameter `param`, sketched over `shape`."""

    param: str
    offset: int
    shape: Tuple[int, ...]
    layer: str  # its layout (E3NN_LINEAR, ..., DENSE above), which the fast path's rules check

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _module_blocks(module: torch.nn.Module, local: str, prefix: str, p: torch.Tensor) -> List[Block]:
    """Blocks of one parameter from the structure of the module that owns it."""
    from e3nn import o3
    from e3nn.nn._fc import _Layer

    name = f"{prefix}.{local}" if prefix else local
    cls = type(module).__name__
    if isinstance(module, o3.Linear) and local == "weight":
        blocks, off = [], 0
        for ins in module.instructions:
            blocks.append(Block(name, off, tuple(ins.path_shape), E3NN_LINEAR))
            off += math.prod(ins.path_shape)
        return blocks
    if isinstance(module, o3.TensorProduct) and local == "weight":
        blocks, off = [], 0
        for ins in module.instructions:
            if ins.has_weight:
                blocks.append(Block(name, off, tuple(ins.path_shape), TENSOR_PRODUCT))
                off += math.prod(ins.path_shape)
        return blocks
    if isinstance(module, _Layer) and local == "weight":
        return [Block(name, 0, tuple(p.shape), MLP_LAYER)]
    if isinstance(module, torch.nn.Linear) and local == "weight":
        return [Block(name, 0, tuple(p.shape), NN_LINEAR)]
    if cls == "Contraction" and (local == "weights_max") and p.dim() == 3:
        return [Block(name, 0, tuple(p.shape), CONTRACTION)]
    if cls == "ParameterList" and prefix.endswith(".weights") and p.dim() == 3:
        return [Block(name, 0, tuple(p.shape), CONTRACTION)]
    return [Block(name, 0, (p.numel(),), DENSE)]


def _in_set(name: str, params: str, num_interactions: int) -> bool:
    if params == "all":
        return True
    if name.startswith("readouts."):
        return True
    if params == "readout":
        return False
    last = num_interactions - 1
    return name.startswith(f"interactions.{last}.") or name.startswith(f"products.{last}.")


def head_share(name: str, n_heads: int) -> float:
    """Fraction of parameter `name` that one head of an n-head MACE model uses: readout weights hold
    one output column (and one hidden block) per head, as mace's remove_pt_head slices them
    (mace/tools/scripts_utils.py); every other parameter is shared by all heads."""
    if n_heads <= 1 or not (name.startswith("readouts.") or name.startswith("embedding_readout.")):
        return 1.0
    if name.endswith("linear_2.weight") or name.endswith("linear_mid.weight"):
        return 1.0 / n_heads**2  # [heads x hidden] -> heads: one hidden block, one output
    return 1.0 / n_heads  # linear.weight ([in] -> heads), linear_1 ([in] -> heads x hidden), biases


def parameter_blocks(model: torch.nn.Module, params: str = "all") -> Tuple[List[Tuple[str, torch.Tensor]], List[Block], float]:
    """(selected named parameters, their blocks, coverage = selected / all trainable parameters).

    For a multi-head model both counts are of the parameters one head uses (head_share): the other
    heads' readout columns get zero gradients, so they add nothing to a head's sketch either.
    """
    if params not in PARAM_SETS:
        raise ValueError(f"params must be one of {PARAM_SETS}, got {params!r}")
    num_interactions = len(getattr(model, "interactions", [])) or 1
    n_heads = len(getattr(model, "heads", None) or [None])
    chosen, blocks, total, covered = [], [], 0.0, 0.0
    for prefix, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            name = f"{prefix}.{local}" if prefix else local
            used = p.numel() * head_share(name, n_heads)
            total += used
            if not _in_set(name, params, num_interactions):
                continue
            chosen.append((name, p))
            blocks.extend(_module_blocks(module, local, prefix, p))
            covered += used
    if not chosen:
        raise ValueError(f"no trainable parameters selected with params={params!r}")
    return chosen, blocks, covered / max(total, 1.0)


def _gaussian(seed: int, key: str, shape: Tuple[int, ...]) -> torch.Tensor:
    digest = hashlib.blake2b(f"ntkal:{seed}:{key}".encode(), digest_size=8).digest()
    gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return torch.randn(shape, generator=gen, dtype=torch.float64)


class Sketch:
    """S: per-parameter gradients -> k-dim sketch, linear, differentiable, deterministic from `seed`."""

    def __init__(self, names: Sequence[str], numels: Sequence[int], blocks: Sequence[Block], k: int,
                 seed: int = 0, dtype=torch.float32, device="cpu"):
        self.k, self.seed = int(k), int(seed)
        self.names, self.numels, self.blocks = list(names), list(numels), list(blocks)
        index = {n: i for i, n in enumerate(self.names)}
        self.block_param = [index[b.param] for b in self.blocks]
        self.factors: List[List[torch.Tensor]] = []
        for b in self.blocks:
            shapes = [(d, self.k) for d in b.shape]
            fs = [_gaussian(self.seed, f"{b.param}@{b.offset}#{j}", s) for j, s in enumerate(shapes)]
            self.factors.append([f.to(dtype=dtype, device=device) for f in fs])

    @classmethod
    def for_model(cls, model: torch.nn.Module, k: int, params: str = "all", seed: int = 0,
                  dtype=torch.float32, device="cpu"):
        chosen, blocks, coverage = parameter_blocks(model, params)
        sk = cls([n for n, _ in chosen], [p.numel() for _, p in chosen], blocks, k, seed, dtype, device)
        sk.coverage = coverage
        sk.parameters = [p for _, p in chosen]
        return sk

    def block_sketch(self, i: int, g: torch.Tensor) -> torch.Tensor:
        """Sketch of block i for R rows of its flat gradient g [R, numel] -> [R, k]."""
        b, fs = self.blocks[i], self.factors[i]
        R = g.shape[0]
        t = g.reshape(R, *b.shape)
        t = torch.matmul(t, fs[-1])  # [R, d_1, ..., d_{r-1}, k]
        for f in reversed(fs[:-1]):
            t = (t * f).sum(-2)
        return t / math.sqrt(self.k)

    def apply(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """grads[j]: the gradient of parameter j for R rows, [R, numel_j] -> sketch [R, k]."""
        out = None
        for i, b in enumerate(self.blocks):
            g = grads[self.block_param[i]]
            s = self.block_sketch(i, g[:, b.offset:b.offset + b.numel])
            out = s if out is None else out + s
        return out
