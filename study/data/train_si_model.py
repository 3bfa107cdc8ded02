"""Train the shipped small Si MACE model: ``python -m study.data.train_si_model``.

Kept for the command recorded in ``si_mace.json``; it is ``study.data.train_model`` with
``--dataset si`` as the default (see that module for what is run and recorded).
"""

from __future__ import annotations

from study.data.train_model import main as _main


def main(argv=None) -> None:
    """Run study.data.train_model with the si dataset unless --dataset says otherwise."""
    _main(argv, default_dataset="si")


if __name__ == "__main__":
    main()
