# The compiled socket paths (_socket_accel.c), used by tcp.py's plain links.
from .base import Buffer

def recv_nowait(fd: int, buffer: Buffer, offset: int) -> int:
    """Read what socket ``fd`` holds into the writable ``buffer`` from ``offset``, without
    blocking: the bytes read, 0 at the end of the stream, -1 when nothing is there.

    Raises:
        ValueError: ``offset`` leaves no room in ``buffer`` (a read of nothing would look
            like the end of the stream), or ``fd`` is negative.
        TypeError, BufferError: ``buffer`` is not a writable buffer.
        OSError: the read failed (the socket was reset, ``fd`` is not a socket...).
    """

def init(received_type: type, data_kind: int, direct_min: int, send_now_max: int) -> None:
    """Set what a :class:`Reader` and a :class:`Sender` make and take: the event type
    (``base.Received``, a slotted class with ``conn_id`` and ``frames``), the DATA kind's
    byte, the frame length from which a received frame is the link's own to receive
    (``tcp.DIRECT_MIN``) and the largest frame a Sender sends (``tcp._SEND_NOW_MAX``).
    Once, before the first Reader or Sender (tcp.py calls it where the module is in use).

    Raises:
        TypeError: ``received_type`` is not a type with those two slots.
        ValueError: ``data_kind`` is not a byte.
    """

class Reader:
    """``Reader(link, endpoint, wait_s)()``: ``endpoint._poll_links()`` for its one
    plain link.

    Where the link waits for the next message with its buffer empty, reads the socket
    into the link's buffer and hands each whole DATA message of one frame, on an open
    connection of a live link, over as ``MultiplexedEndPoint._on_data`` does (to the
    connection's receiver while no event waits, else a ``Received`` event): a frame
    smaller than ``direct_min`` as a copy, a larger one in a buffer from the link's
    ``_pool`` into which the part read is copied and the rest received straight from
    the socket, for up to ``wait_s`` (then the frame is left with the link as its parse
    leaves one being received). Keeps the link's ``_start``/``_end``/``heard`` as its
    parse does; leaves what follows the first other message to the link's ``_parse``
    (and its reads, when the buffer filled up), an end of stream to ``_on_eof`` and a
    failed read to ``_read_failed``. In any other state (mid-message, a low-water mark
    set) it calls ``endpoint._poll_links()``.

    Returns False when the link is dead (nothing to poll) or a message went to a
    receiver, True otherwise, as ``_poll_links`` does. Raises what a receiver or the
    pool raises. Blocks for at most ``wait_s`` (spinning, with the GIL released during
    each read).

    Raises (when made): RuntimeError before :func:`init`; ValueError when ``wait_s``
    is not 0 to 60 seconds; AttributeError, TypeError or ValueError when ``link`` is
    not a tcp link of ``endpoint``.
    """

    def __init__(self, link: object, endpoint: object, wait_s: float) -> None: ...
    def __call__(self) -> bool: ...

class Sender:
    """``Sender(link)(conn_id, frames)``: ``_TcpLink.send_now`` for ``link``.

    With the link alive, its write queue empty and ``frames`` one contiguous buffer of
    at most ``send_now_max`` bytes: the one-frame DATA header and the frame in one
    ``sendmsg``, and True; what the kernel does not take is copied and queued with the
    link's ``_queue_rest`` (the caller's buffer is free either way). False, having sent
    nothing, otherwise (``send_data``'s case: it also makes a non-contiguous frame
    contiguous, or raises what is wrong with it). Never blocks.

    Raises:
        OSError: the send failed (the peer reset the connection...), as ``sendmsg``
            raises it.
        OverflowError: ``conn_id`` is negative or too large.
        TypeError: not called with ``(conn_id, frames)``, or ``frames`` has no length.
    """

    def __init__(self, link: object) -> None: ...
    def __call__(self, conn_id: int, frames: object) -> bool: ...
