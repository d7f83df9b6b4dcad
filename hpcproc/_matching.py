"""Matchers for selective receive: ``match``, ``match_if``, ``match_any``, ``match_chan``.

``receive(*matchers)`` tries the matchers in order against each mailbox message in
arrival order; the first message some matcher accepts is removed and given to that
matcher's handler. Channel matchers take the oldest message of their channel when no
mailbox message matched. A handler may be a plain or an ``async`` function; what it
returns is what ``receive`` returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._channels import ReceivePort

__all__ = ["Matcher", "match", "match_any", "match_chan", "match_if"]


def identity(msg: Any) -> Any:
    """The default handler: the message itself (``receive`` then skips calling it)."""
    return msg


class Matcher:
    """One alternative of a ``receive``; build it with the ``match*`` functions."""

    __slots__ = ("handler", "port", "pred", "type_")

    def __init__(
        self,
        type_: type | tuple[type, ...] | None,
        pred: Callable[[Any], bool] | None,
        handler: Callable[[Any], Any],
        port: ReceivePort[Any] | None = None,
    ) -> None:
        self.type_ = type_
        self.pred = pred
        self.handler = handler
        self.port = port

    def accepts(self, msg: Any) -> bool:
        """Whether this (mailbox) matcher takes ``msg``."""
        if self.type_ is not None and not isinstance(msg, self.type_):
            return False
        return self.pred is None or bool(self.pred(msg))


def match(type_: type | tuple[type, ...], handler: Callable[[Any], Any] = identity) -> Matcher:
    """Accept a message that is an instance of ``type_``; ``handler`` defaults to identity."""
    return Matcher(type_, None, handler)


def match_if(pred: Callable[[Any], bool], handler: Callable[[Any], Any] = identity) -> Matcher:
    """Accept a message for which ``pred(message)`` is true."""
    return Matcher(None, pred, handler)


def match_any(handler: Callable[[Any], Any] = identity) -> Matcher:
    """Accept any message (the oldest one in the mailbox)."""
    return Matcher(None, None, handler)


def match_chan(port: ReceivePort[Any], handler: Callable[[Any], Any] = identity) -> Matcher:
    """Accept the oldest message of channel ``port`` (the current process must own it)."""
    return Matcher(None, None, handler, port)
