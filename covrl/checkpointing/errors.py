"""The checkpoint error, and the root cause of a failed torch.distributed.checkpoint.

Save and load are collective: a failure seen by one rank is raised on every rank with
the same message (:func:`covrl.parallel.raise_if_any_rank`), or the others would wait in
the next collective until the timeout.
"""

from __future__ import annotations

from torch.distributed.checkpoint.api import CheckpointException


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model."""


def _root_cause(exc: BaseException) -> BaseException:
    """The first rank's own exception inside torch.distributed.checkpoint's
    ``CheckpointException`` (a ``BaseException`` holding every failing rank's error)."""
    if isinstance(exc, CheckpointException) and exc.failures:
        cause = next(iter(exc.failures.values()))
        return cause[0] if isinstance(cause, tuple) else cause
    return exc
