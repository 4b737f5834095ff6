"""minidask: a small, readable distributed task scheduler.

The public surface follows dask.distributed, so that code written against
minidask runs unchanged on Dask.
"""

__version__ = "0.1.0"
