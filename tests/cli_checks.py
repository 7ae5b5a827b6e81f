"""What the failure tests share: run the real CLI, read its one error line, plant a payload,
write an image that lies about its size, and the settings of a tiny real training."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from campar_ray.cli import main

TINY_TRAIN = (
    "--num-workers", "1", "--set", "model.backbone=resnet18", "--set", "model.fusion=false",
    "--set", "data.image_size=[32,16]", "--set", "data.pad=2", "--set", "train.batch_size=16",
    "--set", "train.cpus_per_worker=0.5", "--set", "tracking.tensorboard=false",
    "--set", "data.decode_concurrency=1",
)  # fmt: skip
"""``campar train`` options of a tiny run: one worker, ResNet-18 at 32 x 16. One decode task:
on a 2-core machine each task more is one more Ray worker process to start, which made a tiny
run about 1.6x slower (56 s against 31-40 s, training and logits)."""


def run_campar(capsys, *argv: str) -> tuple[int, str, str]:
    """``campar ARGV`` in this process: exit code, stdout and stderr."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    """The command's error line, asserting there is exactly one."""
    errors = [line for line in err.splitlines() if line.startswith("campar ")]
    assert len(errors) == 1, err
    return errors[0]


class Payload:
    """Unpickling this creates ``marker``: what an attacker plants in a run directory."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def black_png(path: Path, width: int, height: int) -> Path:
    """A black 1-bit PNG of ``width`` x ``height``, written without ever holding its pixels: a
    200-megapixel one is about 25 KB on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


class Listener:
    """A TCP listener on 127.0.0.1 that counts the connections made to it: where a hostile
    ``?endpoint_override=`` would send a request signed with the user's key."""

    def __init__(self) -> None:
        import socket
        import threading

        self.connections = 0
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self.port = self._socket.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except OSError:
                continue
            self.connections += 1
            connection.close()

    def close(self) -> int:
        """Stop listening; return how many connections came."""
        self._stop.set()
        self._thread.join()
        self._socket.close()
        return self.connections
