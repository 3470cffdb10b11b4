"""Errors: one base for the whole project, defined by the lowest layer."""
from dataplane.errors import InputError, KernelError, TablesDoNotFit, ZtError

__all__ = ["InputError", "KernelError", "TablesDoNotFit", "ZtError"]
