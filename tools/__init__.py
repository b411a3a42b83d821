"""Tools that chain the pancreas CT synthesis bundles: phantom data, data preparation, bundle checks, studies.

The command line is ``python -m tools <command>`` (or ``pct <command>``); ``python -m tools --help`` lists them.
"""

__version__ = "0.1.0"
