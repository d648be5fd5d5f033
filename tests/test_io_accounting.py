"""What ``io.read`` / ``io.write`` count, exactly, and what they do not.

They are the thread's ``rchar``/``wchar`` from ``/proc/thread-self/io``, which the kernel
advances in the read/write family of syscalls only (fs/read_write.c): read, write, pread64,
pwrite64, readv, writev, preadv, pwritev, and sendfile and copy_file_range (both counters).
Socket calls (send/recv/sendto/recvfrom/sendmsg/recvmsg), splice and memory-mapped IO never
reach them. Each claim in README.md, docs/ and the metric descriptions is asserted here.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import socket

import pytest

import meterage

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/thread-self/io"), reason="needs Linux /proc/thread-self/io"
)


def io_meter(name):
    return meterage.meter(name, probes=("io",), sample=1.0)


def io_of(operation: str) -> tuple[float, float]:
    """(io.read, io.write) summed over the operation's probed calls, of which there must be
    exactly one."""
    (series,) = [s for s in meterage.snapshot() if s.operation == operation]
    assert series.count == 1 and series.histograms["io.read"].count == 1
    return series.histograms["io.read"].sum, series.histograms["io.write"].sum


def measure(unique, work):
    """Runs ``work`` once under an io meter; returns (its result, (io.read, io.write))."""
    name = unique()
    result = io_meter(name)(work)()
    return result, io_of(name)


@pytest.fixture
def sockets():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


# ---- counted -----------------------------------------------------------------------------


def test_a_file_round_trip_with_open_is_exact(tmp_path, unique):
    path = tmp_path / "round.bin"
    payload = os.urandom(123_457)

    def round_trip():
        with open(path, "wb") as handle:
            handle.write(payload)
        with open(path, "rb") as handle:
            return handle.read()

    back, (read, written) = measure(unique, round_trip)
    assert back == payload
    assert (read, written) == (len(payload), len(payload))


def test_a_buffered_write_counts_when_it_is_flushed(tmp_path, unique):
    # open()'s buffer holds small writes; the bytes are counted in the call that flushes.
    handle = open(tmp_path / "buffered.txt", "w")
    try:
        _, (_, written) = measure(unique, lambda: handle.write("x" * 100))
        assert written == 0
        _, (_, written) = measure(unique, handle.flush)
        assert written == 100
    finally:
        handle.close()


def test_a_pipe_round_trip_is_exact(unique):
    r, w = os.pipe()
    try:
        payload = os.urandom(60_000)  # fits the default 64 KiB pipe buffer

        def round_trip():
            assert os.write(w, payload) == len(payload)
            chunks = []
            while sum(map(len, chunks)) < len(payload):
                chunks.append(os.read(r, len(payload)))
            return b"".join(chunks)

        back, io = measure(unique, round_trip)
        assert back == payload
        assert io == (len(payload), len(payload))
    finally:
        os.close(r)
        os.close(w)


def test_os_read_and_write_on_a_socket_are_counted(sockets, unique):
    a, b = sockets

    def round_trip():
        assert os.write(a.fileno(), b"w" * 3000) == 3000
        return os.read(b.fileno(), 10_000)

    back, io = measure(unique, round_trip)
    assert back == b"w" * 3000
    assert io == (3000, 3000)


def test_positional_and_vectored_calls_are_counted(tmp_path, unique):
    fd = os.open(tmp_path / "v.bin", os.O_RDWR | os.O_CREAT, 0o600)
    try:

        def calls():
            assert os.pwrite(fd, b"a" * 500, 0) == 500
            assert os.writev(fd, [b"b" * 70, b"c" * 30]) == 100
            assert os.pwritev(fd, [b"d" * 40], 600) == 40
            assert len(os.pread(fd, 200, 0)) == 200
            assert os.readv(fd, [bytearray(50), bytearray(25)]) == 75
            assert os.preadv(fd, [bytearray(10)], 0) == 10

        _, io = measure(unique, calls)
        assert io == (200 + 75 + 10, 500 + 100 + 40)
    finally:
        os.close(fd)


def test_sendfile_and_copy_file_range_count_both_directions(tmp_path, sockets, unique):
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(20_000))
    a, b = sockets
    with open(source, "rb") as src, open(tmp_path / "copy.bin", "wb") as dst:
        _, io = measure(unique, lambda: os.sendfile(dst.fileno(), src.fileno(), 0, 6000))
        assert io == (6000, 6000)
        _, io = measure(unique, lambda: os.copy_file_range(src.fileno(), dst.fileno(), 7000, 0))
        assert io == (7000, 7000)
        # socket.sendfile() is os.sendfile underneath; the receiving recv is not counted.
        _, io = measure(unique, lambda: (a.sendfile(src, 0, 4000), b.recv(10_000)))
        assert io == (4000, 4000)


# ---- not counted -------------------------------------------------------------------------


def test_socket_send_and_recv_are_not_counted(sockets, unique):
    a, b = sockets
    payload = os.urandom(50_000)

    def round_trip():
        a.sendall(payload)
        chunks = []
        while sum(map(len, chunks)) < len(payload):
            chunks.append(b.recv(65_536))
        return b"".join(chunks)

    back, io = measure(unique, round_trip)
    assert back == payload
    assert io == (0, 0)


def test_recv_into_sendmsg_and_recvmsg_are_not_counted(sockets, unique):
    a, b = sockets

    def round_trip():
        assert a.send(b"1" * 1000) == 1000
        buffer = bytearray(1000)
        assert b.recv_into(buffer) == 1000
        assert a.sendmsg([b"2" * 600, b"3" * 400]) == 1000
        data, *_ = b.recvmsg(2000)
        return bytes(buffer) + data

    back, io = measure(unique, round_trip)
    assert back == b"1" * 1000 + b"2" * 600 + b"3" * 400
    assert io == (0, 0)


def test_asyncio_socket_streams_are_not_counted(unique):
    payload = os.urandom(50_000)

    async def exchange():
        a, b = socket.socketpair()
        _, writer = await asyncio.open_connection(sock=a)
        reader, other = await asyncio.open_connection(sock=b)
        writer.write(payload)
        await writer.drain()
        received = await reader.readexactly(len(payload))
        for stream in (writer, other):
            stream.close()
            await stream.wait_closed()
        return received

    # The whole event loop on this thread: nothing of the transfer is counted.
    back, io = measure(unique, lambda: asyncio.run(exchange()))
    assert back == payload
    assert io == (0, 0)


def test_asyncio_pipe_transports_are_counted_where_they_run(unique):
    # Pipe transports use os.read/os.write. A metered coroutine is charged for its own steps
    # only: the write happens in its step, the read in the loop's callback between steps.
    payload = b"p" * 1000

    async def exchange():
        loop = asyncio.get_running_loop()
        r, w = os.pipe()
        reader = asyncio.StreamReader()
        read_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(r, "rb", 0)
        )
        write_transport, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(w, "wb", 0))
        write_transport.write(payload)
        received = await reader.readexactly(len(payload))
        write_transport.close()
        read_transport.close()
        await asyncio.sleep(0)
        return received

    back, io = measure(unique, lambda: asyncio.run(exchange()))
    assert back == payload
    assert io == (len(payload), len(payload))

    name = unique()
    assert asyncio.run(io_meter(name)(exchange)()) == payload
    assert io_of(name) == (0, len(payload))


def test_splice_is_not_counted(tmp_path, unique):
    source = tmp_path / "splice.bin"
    source.write_bytes(b"s" * 3000)
    r, w = os.pipe()
    try:
        with open(source, "rb") as src, open(tmp_path / "out.bin", "wb") as dst:

            def move():
                assert os.splice(src.fileno(), w, 3000, offset_src=0) == 3000
                assert os.splice(r, dst.fileno(), 3000) == 3000

            _, io = measure(unique, move)
        assert (tmp_path / "out.bin").read_bytes() == b"s" * 3000
        assert io == (0, 0)
    finally:
        os.close(r)
        os.close(w)


def test_mmap_io_is_not_counted(tmp_path, unique):
    path = tmp_path / "mapped.bin"
    path.write_bytes(bytes(8192))
    with open(path, "r+b") as handle, mmap.mmap(handle.fileno(), 8192) as mapped:

        def touch():
            mapped[:4096] = b"m" * 4096
            return mapped[4096:8192]

        back, io = measure(unique, touch)
        assert back == bytes(4096)
        assert io == (0, 0)
    assert path.read_bytes()[:4096] == b"m" * 4096
