"""Hostile recordings (issue 13, items 1 and 2): files that make a reader open *another* file,
and files that decode to far more than they weigh. Each writer makes the file for real, with
the libraries' own writers where they can (h5py external storage, virtual datasets and links;
tifffile OME-XML; PyAV), by hand where no writer will (TIFF directory chains sharing one
strip, loops, deflate streams longer than their strip).

A *victim* folder holds what an attacker wants to read: a token-like file, an HDF5 file, an
OME-TIFF and a video, each full of :data:`MARKER`. Every case states the HTTP status and a
fragment of the message CalSeg must answer with; the tests also check that the victim's files
were never opened (:class:`OpenWatch`, inotify) and that the marker appears in no response.
"""

from __future__ import annotations

import ctypes
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import tifffile

MARKER = b"CALSEG-VICTIM-7f3a9c"
"""Bytes that fill every victim file; no response may contain them."""


@dataclass
class Victim:
    """Files of another user / of the server that a hostile file points at."""

    folder: Path
    secret: Path  # raw bytes (a token file, /etc/passwd, another user's data)
    h5: Path  # an HDF5 file with dataset /data
    tif: Path  # a TIFF (another user's stored recording)
    video: Path  # an MP4 (another user's stored video)

    @property
    def files(self) -> list[Path]:
        return [self.secret, self.h5, self.tif, self.video]


def make_victim(folder: Path) -> Victim:
    """Write the victim files (every byte of image data is :data:`MARKER`)."""
    folder.mkdir(parents=True, exist_ok=True)
    blob = (MARKER * 4096)[: 64 * 64 * 4]
    secret = folder / "token"
    secret.write_bytes(blob)
    frames = np.frombuffer(blob[: 4 * 64 * 64], np.uint8).reshape(4, 64, 64)
    h5 = folder / "victim.h5"
    with h5py.File(h5, "w") as f:
        f["data"] = frames
    tif = folder / "victim.tif"
    tifffile.imwrite(tif, frames, photometric="minisblack")
    video = folder / "victim.mp4"
    _write_video(video, frames, codec="mpeg4")
    return Victim(folder, secret, h5, tif, video)


def _write_video(path: Path, frames: np.ndarray, codec: str = "mpeg4", fps: int = 10) -> None:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "yuv420p"
        for f in frames:
            rgb = np.repeat(f[..., None], 3, axis=2)
            for p in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


class OpenWatch:
    """Counts opens and reads of files (Linux inotify ``IN_OPEN | IN_ACCESS``), whoever does
    them: Python, HDF5's C library, FFmpeg. ``events()`` returns the number since the last
    call."""

    IN_ACCESS, IN_OPEN = 0x1, 0x20

    def __init__(self, paths: list[Path]) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        for p in paths:
            wd = self.libc.inotify_add_watch(self.fd, os.fsencode(p), self.IN_OPEN | self.IN_ACCESS)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {p}")

    def events(self) -> int:
        n = 0
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return n
            off = 0
            while off < len(buf):
                _wd, _mask, _cookie, length = struct.unpack_from("iIII", buf, off)
                off += 16 + length
                n += 1

    def close(self) -> None:
        os.close(self.fd)


# ------------------------------------------------------------------ hand-made TIFF structures


def raw_tiff(
    path: Path,
    *,
    width: int,
    height: int,
    n_pages: int,
    strip: bytes,
    compression: int = 8,
    loop_to: int | None = None,
) -> None:
    """A little-endian classic TIFF of ``n_pages`` uint16 grey pages whose image directories
    all point at the same ``strip`` (one strip per page). ``loop_to``: the last directory's
    next-directory offset points back at directory ``loop_to`` (a loop)."""
    tags = [
        (256, 4, width),  # ImageWidth LONG
        (257, 4, height),  # ImageLength
        (258, 3, 16),  # BitsPerSample SHORT
        (259, 3, compression),
        (262, 3, 1),  # PhotometricInterpretation: min-is-black
        (273, 4, 8),  # StripOffsets: the strip follows the header
        (277, 3, 1),  # SamplesPerPixel
        (278, 4, height),  # RowsPerStrip
        (279, 4, len(strip)),  # StripByteCounts
    ]
    ifd_size = 2 + 12 * len(tags) + 4
    first = 8 + len(strip) + (len(strip) % 2)
    offsets = [first + i * ifd_size for i in range(n_pages)]
    out = bytearray(b"II*\x00" + struct.pack("<I", first) + strip)
    out += b"\x00" * (first - len(out))
    for i in range(n_pages):
        out += struct.pack("<H", len(tags))
        for tag, typ, value in tags:
            if typ == 3:
                out += struct.pack("<HHIHH", tag, typ, 1, value, 0)
            else:
                out += struct.pack("<HHII", tag, typ, 1, value)
        if i + 1 < n_pages:
            nxt = offsets[i + 1]
        else:
            nxt = offsets[loop_to] if loop_to is not None else 0
        out += struct.pack("<I", nxt)
    path.write_bytes(bytes(out))


def zlib_zeros(nbytes: int, level: int = 9) -> bytes:
    """A zlib stream of ``nbytes`` zero bytes, compressed in pieces (never all in memory)."""
    c = zlib.compressobj(level)
    piece = bytes(min(nbytes, 16 * 2**20))
    parts, left = [], nbytes
    while left > 0:
        n = min(left, len(piece))
        parts.append(c.compress(piece[:n]))
        left -= n
    parts.append(c.flush())
    return b"".join(parts)


# ----------------------------------------------------------------------------- the attacks


@dataclass
class Attack:
    """One hostile file: ``write(path, victim)`` makes it; CalSeg must answer ``status`` with
    a message containing ``message`` (case-insensitive)."""

    id: str
    filename: str
    write: Callable[[Path, Victim], None]
    status: int
    message: str
    kind: str  # "reference" (reads another file) or "bomb" (decodes beyond its size)


def _h5_external(relative: bool) -> Callable[[Path, Victim], None]:
    def write(p: Path, v: Victim) -> None:
        target = os.path.relpath(v.secret, p.parent) if relative else str(v.secret)
        with h5py.File(p, "w") as f:
            f.create_dataset(
                "rec", shape=(4, 32, 32), dtype="u1", external=[(target, 0, 4 * 32 * 32)]
            )

    return write


def _h5_vds(p: Path, v: Victim) -> None:
    layout = h5py.VirtualLayout(shape=(4, 64, 64), dtype="u1")
    layout[:] = h5py.VirtualSource(str(v.h5), "data", shape=(4, 64, 64))
    with h5py.File(p, "w") as f:
        f.create_virtual_dataset("rec", layout)


def _h5_vds_unlimited(beside_real_data: bool) -> Callable[[Path, Victim], None]:
    """A virtual dataset with an *unlimited* mapping of the victim's frames: HDF5 opens the
    source as soon as the extent is asked for (a new user's attack run, 2026-12-07: the reader
    listed every dataset's shape before refusing virtual ones). With a harmless dataset that
    sorts first, that upload was accepted."""

    def write(p: Path, v: Victim) -> None:
        from h5py import h5d, h5f, h5p, h5s, h5t

        u = h5s.UNLIMITED
        vspace = h5s.create_simple((0, 64, 64), (u, 64, 64))
        vspace.select_hyperslab((0, 0, 0), (u, 1, 1), stride=(1, 1, 1), block=(1, 64, 64))
        sspace = h5s.create_simple((1, 64, 64), (u, 64, 64))
        sspace.select_hyperslab((0, 0, 0), (u, 1, 1), stride=(1, 1, 1), block=(1, 64, 64))
        dcpl = h5p.create(h5p.DATASET_CREATE)
        dcpl.set_virtual(vspace, str(v.h5).encode(), b"data", sspace)
        fid = h5f.create(str(p).encode(), h5f.ACC_TRUNC)
        h5d.create(fid, b"rec", h5t.NATIVE_UINT8, vspace, dcpl=dcpl).close()
        fid.close()
        if beside_real_data:
            with h5py.File(p, "a") as f:
                f["a_real"] = np.zeros((4, 32, 32), np.uint16)

    return write


def _h5_external_link(p: Path, v: Victim) -> None:
    with h5py.File(p, "w") as f:
        f["rec"] = h5py.ExternalLink(str(v.h5), "/data")


def _h5_external_link_beside_real_data(p: Path, v: Victim) -> None:
    """A harmless dataset first, the external link deep in a group (and a soft link to it)."""
    with h5py.File(p, "w") as f:
        f["a_real"] = np.zeros((4, 32, 32), np.uint16)
        f.create_group("deep/er")["link"] = h5py.ExternalLink(
            os.path.relpath(v.h5, p.parent), "/data"
        )
        f["soft"] = h5py.SoftLink("/deep/er/link")


def _h5_filter(kind: str) -> Callable[[Path, Victim], None]:
    def write(p: Path, v: Victim) -> None:
        data = np.arange(4 * 32 * 32, dtype=np.uint16).reshape(4, 32, 32)
        with h5py.File(p, "w") as f:
            if kind == "lzf":
                f.create_dataset("rec", data=data, chunks=(1, 32, 32), compression="lzf")
            elif kind == "scaleoffset":
                f.create_dataset("rec", data=data, chunks=(1, 32, 32), scaleoffset=0)
            else:  # a filter id no library here knows (Blosc's), stored as is
                d = f.create_dataset(
                    "rec", shape=data.shape, dtype=data.dtype, chunks=(1, 32, 32),
                    compression=32001, allow_unknown_filter=True,
                )  # fmt: skip
                for t in range(4):
                    d.id.write_direct_chunk((t, 0, 0), data[t].tobytes())

    return write


def _h5_chunk_bomb(p: Path, v: Victim) -> None:
    """One 8 KiB chunk whose deflate stream expands to 64 MiB (HDF5 grows its buffer; a
    0.5 MB file of this kind took 500 MB in h5py)."""
    with h5py.File(p, "w") as f:
        d = f.create_dataset(
            "rec", shape=(2, 64, 64), chunks=(1, 64, 64), dtype="u2", compression="gzip"
        )
        d.id.write_direct_chunk((0, 0, 0), zlib_zeros(64 * 2**20))
        d.id.write_direct_chunk((1, 0, 0), zlib.compress(bytes(8192)))


def _h5_declared_huge(p: Path, v: Victim) -> None:
    """A (200000, 2048, 2048) dataset of nothing (fill value): 1.7 TB declared, 2 KB file."""
    with h5py.File(p, "w") as f:
        f.create_dataset("rec", shape=(200_000, 2048, 2048), dtype="u2", chunks=(1, 2048, 2048))


def _ome_xml(uuids: list[tuple[str, str]], own_uuid: str | None, n: int) -> str:
    data = "".join(
        f'<TiffData FirstT="{i}" IFD="{i if fn == "" else 0}" PlaneCount="1">'
        f'<UUID FileName="{fn}">{u}</UUID></TiffData>'
        for i, (u, fn) in enumerate(uuids)
    )
    root_uuid = f' UUID="{own_uuid}"' if own_uuid else ""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"'
        f"{root_uuid}>"
        '<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" '
        f'SizeX="64" SizeY="64" SizeC="1" SizeZ="1" SizeT="{n}">'
        f'<Channel ID="Channel:0:0" SamplesPerPixel="1"/>{data}</Pixels></Image></OME>'
    )


def _ome_uuid(relative: bool, own_too: bool) -> Callable[[Path, Victim], None]:
    """An OME-TIFF whose TiffData/UUID FileName names the victim's TIFF (``own_too``: its first
    plane is its own, the rest another file's, like a real multi-file dataset)."""

    def write(p: Path, v: Victim) -> None:
        name = os.path.relpath(v.tif, p.parent) if relative else str(v.tif)
        own = "urn:uuid:00000000-0000-0000-0000-000000000001"
        other = "urn:uuid:00000000-0000-0000-0000-000000000002"
        refs = [(own, p.name)] if own_too else []
        refs += [(other, name)] * 4
        xml = _ome_xml(refs, own if own_too else None, len(refs))
        tifffile.imwrite(
            p, np.zeros((1, 64, 64), np.uint8), description=xml, photometric="minisblack",
            metadata=None,
        )  # fmt: skip

    return write


def _text(content: str) -> Callable[[Path, Victim], None]:
    def write(p: Path, v: Victim) -> None:
        rel = os.path.relpath(v.video, p.parent)
        p.write_text(content.format(rel=rel, abs=v.video))

    return write


def _ftyp_then_playlist(p: Path, v: Victim) -> None:
    """An ``ftyp`` box (so the magic says MP4) followed by an HLS playlist naming the victim."""
    box = struct.pack(">I", 24) + b"ftypisom" + b"\x00\x00\x02\x00isomiso2"
    p.write_bytes(box + f"#EXTM3U\n#EXTINF:10,\n{v.video}\n#EXT-X-ENDLIST\n".encode())


def _riff_avi_then_concat(p: Path, v: Victim) -> None:
    body = f"ffconcat version 1.0\nfile '{v.video}'\n".encode()
    p.write_bytes(b"RIFF" + struct.pack("<I", len(body) + 4) + b"AVI " + body)


_MOV_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"dinf", b"stbl", b"edts"}


def _boxes(buf: bytes) -> list[tuple[bytes, bytes]]:
    out, off = [], 0
    while off < len(buf):
        size, typ = struct.unpack(">I4s", buf[off : off + 8])
        out.append((typ, buf[off + 8 : off + size]))
        off += size
    return out


def _box(typ: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), typ) + payload


def _alias(target: Path) -> bytes:
    """A QuickTime ``alis`` data-reference entry (a Macintosh alias record, FFmpeg's
    ``mov_read_dref`` layout) naming ``target`` by absolute path; flags 0 = not this file."""
    vol, name, path = b"Macintosh HD", target.name.encode(), str(target).encode()
    rec = b"\0" * 10 + bytes([len(vol)]) + vol.ljust(27, b"\0") + b"\0" * 12
    rec += bytes([len(name)]) + name.ljust(63, b"\0") + b"\0" * 16
    rec += struct.pack(">hh", 0, 0) + b"\0" * 16  # nlvl_from, nlvl_to: an absolute path
    rec += struct.pack(">hh", 2, len(path)) + path + (b"\0" if len(path) % 2 else b"")
    rec += struct.pack(">hh", -1, 0)
    return _box(b"alis", b"\0\0\0\0" + rec)


def _with_dref(boxes: list[tuple[bytes, bytes]], target: Path) -> bytes:
    out = b""
    for typ, payload in boxes:
        if typ == b"dref":
            out += _box(b"dref", b"\0\0\0\0" + struct.pack(">I", 1) + _alias(target))
        elif typ in _MOV_CONTAINERS:
            out += _box(typ, _with_dref(_boxes(payload), target))
        else:
            out += _box(typ, payload)
    return out


def _mov_dref(p: Path, v: Victim) -> None:
    """A QuickTime movie of raw 32 x 32 grey frames whose data reference is an alias of the
    victim's token file: FFmpeg with ``enable_drefs`` shows the token's bytes as pixels."""
    import av

    base = p.with_suffix(".base.mov")
    with av.open(str(base), "w", format="mov") as c:
        s = c.add_stream("rawvideo", rate=10)
        s.width = s.height = 32
        s.pix_fmt = "gray"
        for _ in range(4):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32), np.uint8), format="gray")
            for pkt in s.encode(frame):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    top = _boxes(base.read_bytes())
    base.unlink()
    p.write_bytes(b"".join(_with_dref([(t, b)], v.secret) if t == b"moov" else _box(t, b)
                           for t, b in top))  # fmt: skip


def _tiff_shared_strip_bomb(n_pages: int, side: int) -> Callable[[Path, Victim], None]:
    """``n_pages`` pages of ``side``^2 uint16 sharing one zlib strip of zeros: a file of a few
    hundred kB declaring ``n_pages * side^2 * 2`` bytes (the issue's 2.1 GB case: 1000 x
    1024^2)."""

    def write(p: Path, v: Victim) -> None:
        strip = zlib_zeros(side * side * 2)
        raw_tiff(p, width=side, height=side, n_pages=n_pages, strip=strip)

    return write


def _tiff_strip_bomb(codec: str) -> Callable[[Path, Victim], None]:
    """Two 64 x 64 uint16 pages (8 KiB each) whose one strip expands to 64 MiB (PackBits:
    1 MB)."""

    def write(p: Path, v: Victim) -> None:
        import lzma

        n = 64 * 2**20
        if codec == "zlib":
            strip, compression = zlib_zeros(n), 8
        elif codec == "lzma":
            c = lzma.LZMACompressor()
            piece = bytes(16 * 2**20)
            strip = b"".join(c.compress(piece) for _ in range(n // len(piece))) + c.flush()
            compression = 34925
        else:  # PackBits: a run of 128 zeros is 2 bytes; 64x expansion at most. 16,000
            # bytes: within the longest encoding of the page's 8 KiB (a longer segment is
            # refused before decoding), expanding to 1 MB
            strip, compression = b"\x81\x00" * 8000, 32773
        raw_tiff(p, width=64, height=64, n_pages=2, strip=strip, compression=compression)

    return write


def _tiff_ifd_loop(p: Path, v: Victim) -> None:
    """150 directories, the last pointing back at the 120th (tifffile checks loops only at
    the 100th directory, so it would walk this chain until memory runs out)."""
    raw_tiff(p, width=16, height=16, n_pages=150, strip=zlib.compress(bytes(512)), loop_to=120)


def _h5_one_pixel_chunks(p: Path, v: Victim) -> None:
    """200 x 256 x 256 uint8 in chunks of one value, none written: 1.4 kB on disk, 13.1 M
    chunks. A new-user check's infer job on it reached 21 GiB in 14 minutes (HDF5 spends
    memory and time on every chunk a read touches) before the kernel killed it."""
    with h5py.File(p, "w") as f:
        f.create_dataset("rec", shape=(200, 256, 256), dtype="uint8", chunks=(1, 1, 1))


def _tiff_mixed_shapes(p: Path, v: Victim) -> None:
    """8,192 tiny pages in two alternating shapes (a new user's attack run, 2026-12-07: 25,000
    such pages took the API 52 s to probe, tifffile's generic series being quadratic)."""
    with tifffile.TiffWriter(p) as tw:
        for i in range(8192):
            tw.write(np.zeros((8, 8 + i % 2), np.uint8), photometric="minisblack")


def _tiff_shared_strip_tables(p: Path, v: Victim) -> None:
    """4 pages of 65,536 one-row strips whose StripOffsets/StripByteCounts all point at page
    0's tables (the attack run's 8 MB version took the API from 1.0 to 2.8 GB)."""
    with tifffile.TiffWriter(p) as tw:
        for _ in range(4):
            tw.write(np.zeros((65536, 8), np.uint8), rowsperstrip=1, contiguous=False)
    with tifffile.TiffFile(p) as tf:
        patches = [
            (page.tags[tag].offset + 8, tf.pages[0].tags[tag].valueoffset)
            for page in tf.pages[1:]
            for tag in (273, 279)
        ]
    with open(p, "r+b") as f:
        for at, value in patches:
            f.seek(at)
            f.write(struct.pack("<I", value))


def _jpeg_scan_bomb(p: Path, v: Victim) -> None:
    """A 4096 x 4096 grey progressive JPEG of 2,000 AC scans, each an end-of-band run over
    every block (a new user's attack run, 2026-12-07: 4,000 such scans at 8192^2, 531 kB, took
    19 s to decode, at upload and on every preview)."""

    def seg(marker: int, payload: bytes) -> bytes:
        return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload

    side, blocks = 4096, (4096 // 8) ** 2
    one_code = bytes([1] + [0] * 15)  # a Huffman table of one 1-bit code
    out = b"\xff\xd8" + seg(0xDB, b"\x00" + bytes([1] * 64))
    out += seg(0xC2, b"\x08" + struct.pack(">HH", side, side) + b"\x01\x01\x11\x00")
    out += seg(0xC4, b"\x00" + one_code + b"\x00") + seg(0xC4, b"\x10" + one_code + b"\xe0")
    # DC scan: one 0 bit per block; AC scans: EOB runs of 2^14 + 16383 blocks (code 0, 14 bits)
    out += seg(0xDA, b"\x01\x01\x00\x00\x00\x00") + bytes(blocks // 8)
    bits = ("0" + "1" * 14) * -(-blocks // 32767)
    bits += "1" * (-len(bits) % 8)
    ac = bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))
    ac = ac.replace(b"\xff", b"\xff\x00")
    out += (seg(0xDA, b"\x01\x01\x00\x01\x3f\x00") + ac) * 2000 + b"\xff\xd9"
    p.write_bytes(out)


def _tiff_imagej_fewer_frames_than_pages(p: Path, v: Victim) -> None:
    """48 zlib pages of 512 x 512 uint16 zeros whose ImageJ metadata says 2 images (a fourth
    attack run, 2026-12-07: 48 pages of 8192^2 sharing one strip, 71 kB, made tifffile decode
    3.2 GB against a budget that counted the 2 declared frames)."""
    desc = "ImageJ=1.11a\nimages=2\nframes=2\nhyperstack=true\n"
    tifffile.imwrite(p, np.zeros((48, 512, 512), np.uint16), description=desc, metadata=None,
                     compression="zlib")  # fmt: skip


def _jpeg_after_frame_header(insert: bytes) -> Callable[[Path, Victim], None]:
    """A 64 x 64 JPEG with ``insert`` after its frame header, before the first scan (a fourth
    attack run, 2026-12-07: 12.5 M empty APP segments there, 50 MB, took 46 s and 1.8 GB;
    50 M fill bytes 70 s: Pillow walks them in Python)."""

    def write(p: Path, v: Victim) -> None:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("L", (64, 64)).save(buf, format="JPEG")
        j = buf.getvalue()
        sof = j.index(b"\xff\xc0")
        end = sof + 2 + struct.unpack(">H", j[sof + 2 : sof + 4])[0]
        p.write_bytes(j[:end] + insert + j[end:])

    return write


def _png_empty_image_data_chunks(p: Path, v: Victim) -> None:
    """A 64 x 64 grey PNG whose image data follows 5,000 empty IDAT chunks (a fourth attack
    run, 2026-12-07: 4 M of them, 48 MB, took 8.2 s a read)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    raw = zlib.compress(b"\x00" * (65 * 64))
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 0, 0, 0, 0))
    body = chunk(b"IDAT", b"") * 5000 + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + body)


def _tiff_tile_beyond_image(p: Path, v: Victim) -> None:
    """Two 64 x 64 uint16 pages, each one deflate tile of 8192 x 8192 (a fifth attack run,
    2026-12-07: tiles of 32768^2, 2 MB, took the API to 4.2 GB at upload and per preview)."""
    tifffile.imwrite(p, np.zeros((2, 64, 64), np.uint16), tile=(8192, 8192), compression="zlib",
                     photometric="minisblack")  # fmt: skip


def _png_bomb(p: Path, v: Victim) -> None:
    """A 20000 x 20000 grey PNG (400 Mpx) of zeros: about 400 kB."""
    from PIL import Image

    Image.new("L", (20000, 20000)).save(p, optimize=False)


def attacks() -> list[Attack]:
    """Every hostile file. References: 422. Bombs whose *declared* size is over the budget:
    413 (with the test's small budget); bombs whose data expands beyond what they declare:
    422."""
    R, B = "reference", "bomb"
    return [
        Attack("hdf5-external-storage-absolute", "ext.h5", _h5_external(False), 422,
               "external storage", R),
        Attack("hdf5-external-storage-relative", "extrel.h5", _h5_external(True), 422,
               "external storage", R),
        Attack("hdf5-virtual-dataset", "vds.h5", _h5_vds, 422, "virtual dataset", R),
        Attack("hdf5-virtual-dataset-unlimited", "vdsu.h5", _h5_vds_unlimited(False), 422,
               "virtual dataset", R),
        Attack("hdf5-virtual-dataset-unlimited-beside-real-data", "vdsu2.h5",
               _h5_vds_unlimited(True), 422, "virtual dataset", R),
        Attack("hdf5-external-link", "elink.h5", _h5_external_link, 422, "external link", R),
        Attack("hdf5-external-link-in-group-and-soft-link", "elink2.nwb",
               _h5_external_link_beside_real_data, 422, "external link", R),
        Attack("hdf5-lzf-filter", "lzf.h5", _h5_filter("lzf"), 422, "filter 32000", R),
        Attack("hdf5-scaleoffset-filter", "so.h5", _h5_filter("scaleoffset"), 422,
               "filter 6", R),
        Attack("hdf5-unknown-filter", "blosc.h5", _h5_filter("blosc"), 422, "filter 32001", R),
        Attack("ome-uuid-filename-absolute", "multi.ome.tif", _ome_uuid(False, False), 422,
               "multi-file OME-TIFF", R),
        Attack("ome-uuid-filename-relative-with-own-plane", "multi2.ome.tif",
               _ome_uuid(True, True), 422, "multi-file OME-TIFF", R),
        Attack("hls-playlist-named-mp4", "playlist.mp4",
               _text("#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{abs}\n#EXT-X-ENDLIST\n"),
               422, "not an AVI", R),
        Attack("ffconcat-list-named-avi", "concat.avi",
               _text("ffconcat version 1.0\nfile {rel}\nfile {abs}\n"), 422, "not an AVI", R),
        Attack("ffconcat-list-named-mkv", "concat.mkv",
               _text("ffconcat version 1.0\nfile {abs}\n"), 422, "not an AVI", R),
        Attack("sdp-file-named-mov", "stream.mov",
               _text("v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\n"
                     "m=video 5004 RTP/AVP 96\n"), 422, "not an AVI", R),
        Attack("mp4-magic-then-playlist", "ftyp.mp4", _ftyp_then_playlist, 422,
               "FFmpeg cannot", R),
        Attack("mov-data-reference-to-another-file", "dref.mov", _mov_dref, 422,
               "data reference", R),
        Attack("avi-magic-then-concat-list", "riff.avi", _riff_avi_then_concat, 422,
               "no video stream", R),
        Attack("tiff-declares-2.1GB-in-a-kB-file", "bomb.tif", _tiff_shared_strip_bomb(1000, 1024),
               413, "too large for this server", B),
        Attack("tiff-zlib-strip-expands-past-its-page", "strip.tif", _tiff_strip_bomb("zlib"),
               422, "expands beyond", B),
        Attack("tiff-lzma-strip-expands-past-its-page", "lzma.tif", _tiff_strip_bomb("lzma"),
               422, "expands beyond", B),
        Attack("tiff-packbits-strip-expands-past-its-page", "pb.tif",
               _tiff_strip_bomb("packbits"), 422, "expands beyond", B),
        Attack("tiff-image-directory-loop", "loop.tif", _tiff_ifd_loop, 422, "loops back", B),
        Attack("hdf5-chunk-expands-past-its-size", "chunk.h5", _h5_chunk_bomb, 422,
               "expands beyond", B),
        Attack("hdf5-declares-1.7TB", "huge.h5", _h5_declared_huge, 413,
               "too large for this server", B),
        Attack("png-20000x20000", "huge.png", _png_bomb, 413, "pixels", B),
        Attack("jpeg-2000-progressive-scans", "scans.jpg", _jpeg_scan_bomb, 422,
               "a JPEG of more than 256 scans", B),
        Attack("tiff-8192-pages-of-two-shapes", "mixed.tif", _tiff_mixed_shapes, 422,
               "pages of 2 different kinds", B),
        Attack("tiff-pages-sharing-strip-tables", "shared.tif", _tiff_shared_strip_tables, 422,
               "share one table of 65,536 strip", B),
        Attack("hdf5-13M-one-value-chunks", "tinychunks.h5", _h5_one_pixel_chunks, 422,
               "13,107,200 chunks of 1 x 1 x 1", B),
        Attack("tiff-imagej-says-2-frames-over-48-pages", "ijlie.tif",
               _tiff_imagej_fewer_frames_than_pages, 422, "metadata does not describe the file",
               B),
        Attack("tiff-8192-tiles-on-64-px-pages", "tiles.tif", _tiff_tile_beyond_image, 422,
               "tiles of width 8,192 for an image of width 64", B),
        Attack("jpeg-empty-segments-after-frame-header", "apps.jpg",
               _jpeg_after_frame_header(b"\xff\xe1\x00\x02" * 5000), 422,
               "marker segments before its first scan", B),
        Attack("jpeg-fill-bytes-before-first-scan", "fill.jpg",
               _jpeg_after_frame_header(b"\xff" * 50_000), 422, "fill or stray bytes", B),
        Attack("png-empty-image-data-chunks", "idat.png", _png_empty_image_data_chunks, 422,
               "image data chunks of under 256 bytes", B),
    ]  # fmt: skip
