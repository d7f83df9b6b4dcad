# The compiled socket read (_socket_accel.c), used by tcp.py's plain links.
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
