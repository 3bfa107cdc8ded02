"""Errors that ntkal reports to users as one readable line (the CLI prints them without a traceback)."""


class NtkalError(Exception):
    """Base class of every error ntkal raises on purpose."""


class InputError(NtkalError):
    """Bad user input: a file, a structure or an option. Names the file and the structure index."""

    def __init__(self, message: str, path=None, index=None):
        self.path = None if path is None else str(path)
        self.index = index
        where = "" if self.path is None else f"{self.path}: "
        if index is not None:
            where += f"structure {index} (0-based): "
        super().__init__(where + message)


class ModelError(NtkalError):
    """The model cannot be used (not a MACE model, unreadable file, unsupported layer)."""
