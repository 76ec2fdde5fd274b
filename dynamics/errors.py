"""The one exception type for bad input.

`InputError` means "the user asked for something that cannot be done as asked": a missing or
malformed file, an unknown name, an out-of-range hyper-parameter, an output path that would
overwrite a run. Library code raises it *before* heavy work and before writing anything; the
`dynamics` command prints its message and exits with status 2, without a traceback. Any other
exception is a bug (or an environment failure) and keeps its traceback.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input, explained in the message (name the file, field or value and what is valid)."""
