"""A failure on some ranks, raised on every rank.

A check that fails on some ranks only (a file one node cannot read, a scorer error on
the rank that ran it, rank 0's write of a checkpoint) must not leave the other ranks
waiting in the next collective until its timeout. Every rank passes its own outcome
(an exception, a message, or None) to :func:`raise_if_any_rank`, and all of them
raise the same one-line error naming the first failing rank.
"""

from __future__ import annotations

import torch.distributed as dist

from covrl.parallel.groups import SINGLE_PROCESS, Group, rank_and_size
from covrl.utils.errors import first_line

__all__ = ["raise_if_any_rank"]


def _message(error: BaseException | str) -> str:
    if isinstance(error, BaseException):
        return first_line(error)
    return error if error.strip() else "error with an empty message"


def raise_if_any_rank(
    error: BaseException | str | None,
    group: Group,
    *,
    error_type: type[Exception] = RuntimeError,
    what: str | None = None,
) -> None:
    """Collective over ``group``: if any rank passes an error, raise it on every rank.

    Args:
        error: this rank's failure: an exception (reported by its first line, or its
            type name when its message is empty), a message, or None for success.
        group: the ranks that would otherwise wait for each other, e.g.
            ``torch.distributed.group.WORLD``; :data:`SINGLE_PROCESS` raises this
            rank's error without a collective.
        error_type: the exception class raised (called with the message), e.g. the
            caller's ``ConfigError`` or ``CheckpointError``.
        what: the operation, for ``"<what> failed on rank R: <message>"``; without it
            the message is ``"<message> (on rank R)"``.

    The message is the first failing rank's (in group order), naming its global rank
    and how many other ranks failed too. Returns None when no rank failed.
    """
    message = None if error is None else _message(error)
    _, size = rank_and_size(group)
    if group is SINGLE_PROCESS:
        messages = [message]
        ranks = [dist.get_rank() if dist.is_initialized() else 0]
    else:
        messages = [None] * size
        dist.all_gather_object(messages, message, group=group)
        ranks = [dist.get_global_rank(group, r) for r in range(size)]
    failed = [(rank, m) for rank, m in zip(ranks, messages, strict=True) if m is not None]
    if not failed:
        return
    rank, first = failed[0]
    more = len(failed) - 1
    if what is None:
        others = f" and {more} other rank{'s' if more > 1 else ''}" if more else ""
        raise error_type(f"{first} (on rank {rank}{others})")
    others = f" (and {more} more rank{'s' if more > 1 else ''})" if more else ""
    raise error_type(f"{what} failed on rank {rank}{others}: {first}")
