"""Experiments run with covrl, kept in the repository and not installed with the package.

Each subpackage is a harness that the scripts in ``tools/`` drive (``make reproduce``:
:mod:`experiments.reproduce`). Those scripts put the repository root on ``sys.path``.
"""
