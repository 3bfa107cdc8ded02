"""Shared test set-up: Triton runs under its interpreter when there is no GPU; mace is imported before e3nn."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mace  # noqa: E402,F401  (must come before e3nn: docs/design.md, Imports)

# Tiny models: intra-op threads only add overhead, and they slow to a crawl when the box is shared.
torch.set_num_threads(1)
