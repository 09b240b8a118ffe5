"""The one error type meant for the user.

Its own file so that anything can raise it (data.py, checkpoint.py, the model files through
parallel.UsageError) without importing the parallel machinery or the Triton kernels.
"""


class UsageError(ValueError):
    """Bad input from the user (flags, paths, layouts, damaged files). train.py, convert.py
    and generate.py print its message as one line, `error: ...`, and exit with status 2,
    instead of a traceback."""
