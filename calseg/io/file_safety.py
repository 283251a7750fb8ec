"""What a recording file may make a reader do: read only itself, and decode no more than it
declares.

Uploaded recordings come from users who must not read each other's files or the server's.
Several formats can name *other* files from inside a file, and the libraries follow those names
by default; several codecs expand without a bound. This module holds the guards that
:mod:`calseg.io.recordings` applies to each reader (the audit, reader by reader, is in
``docs/ARCHITECTURE.md``, section "Reading untrusted recordings"):

* **Confinement.** TIFF is parsed from a file object without a file descriptor
  (:class:`ConfinedFile`), so tifffile cannot open OME-TIFF multi-file parts, Micro-Manager
  ``_MMStack`` siblings or an ``NDTiff.index``; OME-XML naming other files is refused
  (:func:`ome_foreign_files`). HDF5 files with external raw storage, virtual datasets,
  external or user-defined links are refused (:func:`check_hdf5_file`,
  :func:`check_hdf5_storage` on every dataset before any dataset's extent is read,
  :func:`check_hdf5_dataset`). Videos are opened from a file object with the container format
  fixed from the file's magic bytes and ``protocol_whitelist=none`` (:func:`open_video`), so no
  playlist, concat list, data reference or URL inside a container is ever opened.
* **Bounded decoding.** TIFF zlib/deflate, LZMA and PackBits segments are decoded into at most
  the size their image directory declares (:func:`install_bounded_tiff_codecs`); a segment that
  expands further is refused. HDF5 chunks are decoded only through the filters CalSeg checks
  (:data:`HDF5_FILTERS`: deflate, shuffle, fletcher32), and each deflate stream is verified to
  expand to at most the chunk's size before HDF5 decodes it (:class:`Hdf5ChunkGuard`): HDF5's
  own deflate filter grows its buffer without a limit (measured: a 0.5 MB file with one 8 KiB
  chunk took 500 MB). TIFF image-directory chains are walked with a cap and a loop check
  before tifffile parses them (:func:`count_tiff_pages`): tifffile detects loops only at the
  100th directory; the same walk bounds what tifffile's parse costs (mixed page shapes,
  strip and tile counts, strip tables shared between pages).

Every refusal raises :class:`UnsafeRecording` (a ``ValueError``) whose message names the
feature and what to do instead.
"""

from __future__ import annotations

import io
import lzma
import math
import struct
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "HDF5_FILTERS",
    "MAX_HDF5_OBJECTS",
    "MAX_TIFF_PAGES",
    "VIDEO_FORMATS",
    "ConfinedFile",
    "Hdf5ChunkGuard",
    "UnsafeRecording",
    "check_hdf5_dataset",
    "check_hdf5_file",
    "check_hdf5_storage",
    "check_image_segments",
    "check_jpeg_scans",
    "check_ome_sizes",
    "no_hdf5_plugins",
    "mov_sample_count",
    "count_tiff_pages",
    "install_bounded_tiff_codecs",
    "install_tiff_series_guard",
    "ome_foreign_files",
    "open_video",
    "sniff_video_format",
]

MAX_TIFF_PAGES = 1_000_000
"""Most image directories (pages) a TIFF may hold. tifffile parses every directory when it
builds a series: 100,000 one-frame pages took 2.7 s and 9 MB here
(``/tmp`` experiment, tifffile 2026.3.3), so the cap bounds parsing at about half a minute;
10^6 frames is 9 h at 30 Hz, beyond any calcium recording CalSeg segments in one piece."""

MAX_MIXED_TIFF_PAGES = 4096
"""Most pages a TIFF whose pages have more than one shape may hold (:func:`count_tiff_pages`).
tifffile's generic series is quadratic in the pages of one shape: 2,000 / 4,000 / 8,000 tiny
pages in two alternating shapes took 0.17 / 0.49 / 1.71 s to probe here (2-core machine,
tifffile 2026.3.3, 2026-12-07), so 4,096 bounds it under about half a second; a recording
with a thumbnail page beside more frames than that is refused with what to do."""
MAX_SHARED_TIFF_VALUE = 4096
"""Largest out-of-line TIFF value (bytes) that several directories may share, counted once by
:func:`count_tiff_pages` (ImageJ shares its description and resolutions between pages); a
larger one is counted for every directory pointing at it, since the reader loads it for each
(every page's description at one 8 MB stretch: 400 pages took 3.1 GB)."""
MAX_TIFF_SEGMENTS = 2_097_152
"""Most strips or tiles a TIFF may hold in all (:func:`count_tiff_pages`): tifffile keeps
their offsets and byte counts as Python tuples, about 72 bytes a segment, so 2^21 is about
150 MB of the reader's memory. A 4 GiB recording in libtiff's default strips of about 8 KiB
has 2^19."""

MAX_IMAGE_SEGMENTS = 1024
"""Most JPEG marker segments before the first scan, PNG chunks besides image data, or small
PNG image data chunks an image may hold (:func:`check_image_segments`; a camera JPEG has about
10 segments, a PNG a handful of chunks)."""
MAX_JPEG_LOOSE_BYTES = 4096
"""Most bytes outside marker segments (fill bytes ``FF``, stuffed ``FF 00``, junk) a JPEG may
hold before its first scan (:func:`check_image_segments`). Encoders write none; Pillow steps
over each in Python (about 1.4 us a byte: 50 MB of fill bytes took 70 s)."""
MAX_JPEG_EXIF_SEGMENTS = 8
"""Most EXIF (APP1 ``Exif``) segments a JPEG may hold before its first scan. EXIF fits in one
64 KiB segment; Pillow appends each further one to the bytes so far (quadratic): 1,000 of
64 KiB (65 MB) took 30 s and 320 MB (a fifth attack run, 2026-12-07)."""
MIN_PNG_DATA_CHUNK = 256
"""PNG image data chunks (IDAT, fdAT) under this many bytes count against
:data:`MAX_IMAGE_SEGMENTS` (:func:`check_image_segments`)."""
MAX_JPEG_SCANS = 256
"""Most scans a JPEG may hold (:func:`check_jpeg_scans`). Decoding cost grows by about 5 ms a
scan at 8192 x 8192 (the attack run's 4,000 scans: 19 s), so 256 bound it near 1.3 s; libjpeg's
progressive scripts write 6 (grey) to 10 (colour) scans."""

MAX_VIDEO_FRAMES = 65_536
"""Most frames a video may hold (:mod:`calseg.io.recordings`, from its header or its packets).
Video frames decode in order, so reaching frame ``t`` decodes every frame before it, and
each costs about 48 us even at 64 x 64 (20,000 black frames of a 281 kB MP4 in 0.96 s here,
2-core machine, 2026-12-07): the pixel budget alone let a video of 8 x 8 frames hold 2^25
frames, about 27 minutes of the API's CPU for one preview of its last frame (and the upload
check decodes the last frame). 2^16 frames bound it near 3 s; that is 36 h at one frame per
2 s, 36 min at 30 fps (TIFF allows :data:`MAX_TIFF_PAGES`)."""

MAX_VIDEO_STREAMS = 4
"""Most streams a video container may hold (video, audio, timecode, subtitles): FFmpeg opens a
decoder and decodes a packet of each while reading the header (:func:`open_video`)."""
MAX_VIDEO_SAMPLES = 1_048_576
"""Most samples an MP4/MOV may declare in all its tracks (:func:`mov_sample_count`): FFmpeg
indexes each while it opens the file (about 70 bytes a sample: 6e7 took 4.1 GB), so 2^20 is
about 70 MB. Audio tracks count too: an hour of 48 kHz AAC is about 170,000 samples."""

MAX_HDF5_OBJECTS = 10_000
"""Most links an HDF5 file may hold (groups + datasets + links); visiting them is header work
that must stay bounded. NWB files hold a few hundred."""

MAX_HDF5_CHUNKS = 1_048_576
"""Most chunks a chunked HDF5 dataset may be stored in when its chunks are smaller than
:data:`MIN_HDF5_CHUNK_BYTES`. HDF5 spends time and, within one read call, memory on every
chunk a read touches, written or not (``scripts/hdf5_chunk_cost.py``: 4.8-12 us per chunk;
327,680 chunks of 1 x 1 px read in one call peaked at 2.1-8.3 GB, about 6 KB per chunk). A
1,400-byte upload of 200 x 256 x 256 in 1-value chunks (13.1 M chunks) took a job to 21 GiB
and 14 minutes before the kernel killed it (a new-user check). Chunks of at least 4 KiB cost
at most 262,144 chunks per GiB of data, which the decode budget and the memory checks bound
already."""

MIN_HDF5_CHUNK_BYTES = 4096
"""Chunks of at least this size are not counted against :data:`MAX_HDF5_CHUNKS` (one frame per
chunk, h5py's default chunking and 64 x 64 uint8 or 32 x 32 float32 tiles all are)."""

MAX_HDF5_DEPTH = 32
"""Deepest group nesting an HDF5 file may have (:func:`check_hdf5_file`; NWB files nest 3-5
deep)."""
MAX_HDF5_CHUNK_BYTES = 64 * 2**20
"""Largest decoded HDF5 chunk accepted when it holds more than one frame (bytes): each frame
read decodes its whole chunk (twice with deflate: verified, then by HDF5), so a 1 MB file
stored as one 1 GiB deflate chunk took 50 s and 2.1 GB to probe (a second attack run,
2026-12-07); a chunk of one frame is accepted at any size the frame limit allows."""
MAX_HDF5_CHUNKS_PER_READ = 16_384
"""Most chunks one HDF5 read call may touch (:func:`hdf5_read_in_blocks` splits larger reads):
about 100 MB of HDF5's per-chunk bookkeeping (:data:`MAX_HDF5_CHUNKS`)."""

HDF5_FILTERS = {1: "deflate (gzip)", 2: "shuffle", 3: "fletcher32"}
"""HDF5 filters CalSeg decodes, by filter id (HDF5 ``H5Z_FILTER_*``). Deflate streams are
verified against the chunk size first (:class:`Hdf5ChunkGuard`); shuffle and fletcher32 do not
change a chunk's size. Everything else is refused: LZF and N-bit grow their output buffer from
values stored in the file, szip/scale-offset/Blosc/user filters cannot be checked here."""

VIDEO_FORMATS = {"mov": "MP4/MOV", "avi": "AVI", "matroska": "MKV/WebM", "asf": "WMV/ASF"}
"""FFmpeg demuxers CalSeg opens videos with (chosen from the magic bytes, never probed)."""

DEFLATE_MAX_RATIO = 1032
"""Largest expansion of a deflate stream (RFC 1951: a 258-byte match in as little as 2 bits)."""


class UnsafeRecording(ValueError):
    """The file asks the reader to read another file, or to decode more than it declares."""


# --------------------------------------------------------------------------------------------
# A file object without a file descriptor.


class ConfinedFile(io.RawIOBase):
    """A read-only, seekable view of one open file that hides its descriptor and directory.

    tifffile opens other files (OME multi-file parts, ``_MMStack`` siblings, ``NDTiff.index``)
    only when its file handle "is a file" (has ``fileno()``) and knows its directory; this
    object has neither, so tifffile reads this file and nothing else. ``name`` is the bare file
    name (OME-XML compares it with ``UUID FileName``).
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._fh = open(path, "rb")  # noqa: SIM115 - closed in close()
        self.name = Path(path).name
        self.mode = "rb"

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        return self._fh.readinto(b)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def fileno(self) -> int:
        raise OSError("a confined recording has no file descriptor")

    def close(self) -> None:
        if not self.closed:
            self._fh.close()
        super().close()


# --------------------------------------------------------------------------------------------
# TIFF


_TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8,
                    13: 4, 16: 8, 17: 8, 18: 8}  # fmt: skip
"""Bytes per value of each TIFF field type (TIFF 6.0 section 2; BigTIFF types 16-18)."""
_TIFF_INT_CODES = {
    1: "B",
    3: "H",
    4: "I",
    6: "b",
    8: "h",
    9: "i",
    13: "I",
    16: "Q",
    17: "q",
    18: "Q",
}
"""struct codes of the integer field types (values read by the walk)."""
_TIFF_SEGMENT_TAGS = (273, 324)  # StripOffsets, TileOffsets
_TIFF_SUBIFDS_TAG = 330
_TIFF_SERIES_TAGS = (256, 257, 258, 259, 262, 266, 277, 278, 284, 317, 322, 323, 338, 339, 530,
                     32997, 32998)  # fmt: skip
"""Tags whose values tell which pages tifffile puts in one series (``TiffPage.hash``: width,
length, depth, bits, compression, photometric, fill order, samples, rows per strip, planar
configuration, predictor, tile size, extra samples, sample format, subsampling)."""
_TIFF_UIC1_TAG = 33628  # MetaMorph STK UIC1
MAX_STK_UIC1_ENTRIES = 4096
"""Most entries a MetaMorph UIC1 tag may hold (:meth:`_TiffWalk.directory`). tifffile builds a
Python dict per entry, following its offset, twice: 10^6 entries pointing at one 520-byte
record (8 MB) took 34 s and 1.55 GB (a fifth attack run, 2026-12-07); MetaMorph writes tens."""
MAX_TIFF_KINDS = 64
"""Most kinds of pages (distinct values of tifffile's page hash) a TIFF may hold: tifffile
makes a series of each and compares every series with every other one when it looks for
pyramid levels (``pyramidize_series``): 4,096 pages of distinct shapes (500 kB) took 66 s (a
fifth attack run, 2026-12-07). A recording with thumbnails or a pyramid has a handful."""
MAX_TIFF_TILE_SLACK = 1024
"""A tile side may reach this many pixels whatever its image's size (a writer's fixed tile
size on a small image; :func:`_check_tile_size`)."""
_TIFF_SMALL_ARRAY = 16
"""Out-of-line values of series tags read up to this many (e.g. BitsPerSample of RGB)."""


def count_tiff_pages(fh: Any, size: int, limit: int | None = None) -> int:
    """Walk a TIFF's image directories (IFDs) before tifffile parses them: the chain of pages
    and every SubIFD under them, reading each directory's entries and small values (no image
    data).

    Refuses what would make tifffile's own parse slow or large in memory, whatever the file's
    size (two new users' attack runs, 2026-12-07):

    * more than ``limit`` directories (pages and SubIFDs), a chain that loops back, or a
      directory reached twice (tifffile's "shaped" series follows SubIFDs recursively: a chain
      of directories each listing the next 4 times, 1.6 kB, made 4^9 pages, 35 s and 1.4 GB);
    * pages of more than one kind (the values of :data:`_TIFF_SERIES_TAGS`), or any SubIFD, in
      a file of more than :data:`MAX_MIXED_TIFF_PAGES` directories: tifffile then builds a
      "generic" series, which compares every page with every earlier page of its kind
      (quadratic: 25,000 tiny pages in two alternating shapes, 2.85 MB, took 52 s; pages
      differing only in Photometric or carrying one SubIFD each, 73-116 s at 32,000);
    * more than :data:`MAX_TIFF_SEGMENTS` strips or tiles in all: tifffile keeps two Python
      tuples per page of their offsets and byte counts (about 72 bytes a segment, 9x the
      file's 8) and decodes strip by strip;
    * two directories whose strip or tile tables are the same bytes of the file (32 pages
      sharing one 1 M-entry table, 8 MB, took the API from 1.0 to 2.8 GB);
    * directories and their out-of-line values (tables, descriptions, any tag; one shared
      value of at most :data:`MAX_SHARED_TIFF_VALUE` bytes counted once) that together claim
      more bytes than the file holds (:func:`_check_claimed`): stored apart, as writers store
      them, they fit; overlapping or shared, they are parsed again and again (every page's
      ImageDescription pointing at one 8 MB stretch: 400 pages took 3.1 GB). So the walk reads
      each byte at most once.

    Args:
        fh: the open file (binary, seekable); its position is restored.
        size: the file size in bytes.
        limit: most directories accepted (default :data:`MAX_TIFF_PAGES`).

    Returns:
        The number of pages in the chain (stopping, like tifffile, at an offset of 0 or past
        the end of the file: truncation is reported by the reader).

    Raises:
        UnsafeRecording: as above.
    """
    limit = MAX_TIFF_PAGES if limit is None else limit
    pos = fh.tell()
    try:
        fh.seek(0)
        head = fh.read(16)
        order = {b"II": "<", b"MM": ">"}.get(head[:2])
        if order is None or len(head) < 8:
            return 0
        version = struct.unpack(order + "H", head[2:4])[0]
        if version == 43:  # BigTIFF
            if len(head) < 16:
                return 0
            offset = struct.unpack(order + "Q", head[8:16])[0]
            walk = _TiffWalk(fh, size, order, "Q", 8, order + "HHQQ", limit)
        else:
            offset = struct.unpack(order + "I", head[4:8])[0]
            walk = _TiffWalk(fh, size, order, "H", 4, order + "HHII", limit)
        pages = 0
        while 0 < offset < size:
            if offset in walk.seen:
                raise UnsafeRecording(
                    f"its chain of image directories loops back to the directory at byte "
                    f"{offset} after {pages} directories (a damaged or crafted file); "
                    "export the recording again"
                )
            nxt = walk.directory(offset)
            if nxt is None:
                break
            pages += 1
            offset = nxt
        while walk.subifds:  # SubIFDs (and theirs): each once; their chains are not followed
            sub = walk.subifds.pop()
            if not 0 < sub < size:
                continue
            if sub in walk.seen:
                raise UnsafeRecording(
                    f"its directory at byte {sub} is reached twice through SubIFDs (a loop or "
                    "a shared sub-image: a damaged or crafted file); export the recording again"
                )
            walk.directory(sub)
        return pages
    finally:
        fh.seek(pos)


class _TiffWalk:
    """State of :func:`count_tiff_pages`: directories seen, the page kinds, strips and tiles,
    bytes claimed, SubIFDs still to visit."""

    def __init__(
        self, fh: Any, size: int, order: str, count_fmt: str, off_size: int, entry_fmt: str,
        limit: int,
    ) -> None:  # fmt: skip
        self.fh, self.size, self.order = fh, size, order
        self.count_fmt, self.count_size = count_fmt, struct.calcsize(count_fmt)
        self.off_size, self.entry_fmt = off_size, entry_fmt
        self.entry = struct.calcsize(entry_fmt)
        self.limit = limit
        self.seen: set[int] = set()
        self.kinds: set[tuple] = set()
        self.tables: dict[int, int] = {}  # out-of-line segment table offset -> directory
        self.subifds: list[int] = []
        self.small: set[int] = set()  # offsets of small out-of-line values already counted
        self.n_sub = 0
        self.n_segments = 0
        self.claimed = 8  # the header

    def claim(self, nbytes: int) -> None:
        self.claimed += nbytes
        _check_claimed(self.claimed, self.size)

    def values(self, typ: int, count: int, value: int, raw_value: bytes) -> list[int] | None:
        """The integer values of an entry (inline or out of line); None for other types."""
        code = _TIFF_INT_CODES.get(typ)
        if code is None:
            return None
        nbytes = count * _TIFF_TYPE_SIZES[typ]
        if nbytes <= self.off_size:
            data = raw_value[:nbytes]
        else:
            self.fh.seek(value)
            data = self.fh.read(nbytes)
            if len(data) < nbytes:
                return None
        return list(struct.unpack(f"{self.order}{count}{code}", data))

    def directory(self, offset: int) -> int | None:
        """Read the directory at ``offset``; the next directory's offset (None: truncated)."""
        self.seen.add(offset)
        n_dirs = len(self.seen)
        if n_dirs > self.limit:
            raise UnsafeRecording(
                f"it holds more than {self.limit:,} image directories (pages and SubIFDs); "
                f"CalSeg reads at most {self.limit:,} frames from one TIFF: split the "
                "recording into parts"
            )
        self.fh.seek(offset)
        raw = self.fh.read(self.count_size)
        if len(raw) < self.count_size:
            return None
        n = struct.unpack(self.order + self.count_fmt, raw)[0]
        self.claim(self.count_size + n * self.entry + self.off_size)
        raw = self.fh.read(n * self.entry + self.off_size)
        if len(raw) < n * self.entry + self.off_size:
            return None
        kind: dict[int, tuple] = dict.fromkeys(_TIFF_SERIES_TAGS, ())
        value_at = self.entry - self.off_size
        for i, (tag, typ, count, value) in enumerate(
            struct.iter_unpack(self.entry_fmt, raw[: n * self.entry])
        ):
            nbytes = count * _TIFF_TYPE_SIZES.get(typ, 1)
            out_of_line = nbytes > self.off_size
            if out_of_line and (nbytes > MAX_SHARED_TIFF_VALUE or value not in self.small):
                # any tag's value (a table, a description, ...), counted for every directory
                # that points at it; a small one once (ImageJ points every page at the first
                # page's description and resolutions)
                self.small.add(value)
                self.claim(nbytes)
            raw_value = raw[i * self.entry + value_at : (i + 1) * self.entry]
            if tag in kind:
                vals = (
                    self.values(typ, count, value, raw_value)
                    if count <= _TIFF_SMALL_ARRAY
                    else None
                )
                kind[tag] = tuple(vals) if vals is not None else (typ, count)
            elif tag in _TIFF_SEGMENT_TAGS:
                self.n_segments += count
                if self.n_segments > MAX_TIFF_SEGMENTS:
                    raise UnsafeRecording(
                        f"its pages are cut into more than {MAX_TIFF_SEGMENTS:,} strips or "
                        f"tiles in all (directory {n_dirs - 1} alone into {count:,}); the TIFF "
                        "reader keeps and decodes each one separately: re-save it with "
                        "whole-frame strips (tifffile: rowsperstrip=height) or larger tiles"
                    )
                if out_of_line:
                    other = self.tables.setdefault(value, n_dirs - 1)
                    if other != n_dirs - 1:
                        raise UnsafeRecording(
                            f"directories {other} and {n_dirs - 1} share one table of "
                            f"{count:,} strip or tile offsets at byte {value} (a crafted file: "
                            "the file holds it once, the reader builds it for every page); "
                            "export the recording again"
                        )
            elif tag == _TIFF_UIC1_TAG and count > MAX_STK_UIC1_ENTRIES:
                raise UnsafeRecording(
                    f"its MetaMorph UIC1 tag holds {count:,} entries (a MetaMorph file has tens; "
                    f"at most {MAX_STK_UIC1_ENTRIES:,} are read): the TIFF reader builds each "
                    "one in Python, following its offset; export the recording again"
                )
            elif tag == _TIFF_SUBIFDS_TAG:
                vals = self.values(typ, count, value, raw_value) or []
                self.n_sub += len(vals)
                self.subifds.extend(vals)
        _check_tile_size(kind, n_dirs - 1)
        self.kinds.add(tuple(kind.values()))
        if len(self.kinds) > MAX_TIFF_KINDS:
            raise UnsafeRecording(
                f"its pages come in more than {MAX_TIFF_KINDS} different kinds (e.g. "
                f"{_shape_text(sorted(self.kinds)[:2])}): the TIFF reader compares every "
                "series with every other one; write the recording's frames into a TIFF of "
                "their own (one shape, one page per frame)"
            )
        mixed = len(self.kinds) > 1 or self.n_sub > 0
        if mixed and n_dirs + len(self.subifds) > MAX_MIXED_TIFF_PAGES:
            why = (
                f"pages of {len(self.kinds)} different kinds (e.g. "
                f"{_shape_text(sorted(self.kinds)[:2])})"
                if len(self.kinds) > 1
                else f"{self.n_sub:,} SubIFDs (sub-images)"
            )
            raise UnsafeRecording(
                f"it holds more than {MAX_MIXED_TIFF_PAGES:,} image directories, and {why}: "
                "the TIFF reader's cost grows with the square of the page count when pages "
                "differ; write the recording's frames into a TIFF of their own (one shape, one "
                "page per frame)"
            )
        return struct.unpack(
            self.order + ("Q" if self.off_size == 8 else "I"), raw[n * self.entry :]
        )[0]


def _tag_int(kind: dict[int, tuple], tag: int) -> int | None:
    """The one integer value of a series tag of :meth:`_TiffWalk.directory` (None: absent or
    not one integer)."""
    v = kind.get(tag) or ()
    return int(v[0]) if len(v) == 1 else None


def _check_tile_size(kind: dict[int, tuple], index: int) -> None:
    """Refuse a tile larger than its image needs: each side at most the image's side rounded
    up to 16 (the TIFF tile unit) or :data:`MAX_TIFF_TILE_SLACK`, whichever is larger, and a
    tile depth at most the image depth. tifffile decodes whole tiles and the decode budget
    counts the image: 64 x 64 pages of one 32768 x 32768 deflate tile (2 MB) took the API to
    4.2 GB at upload and on every preview (a fifth attack run, 2026-12-07)."""
    tile_w, tile_l = _tag_int(kind, 322), _tag_int(kind, 323)
    if tile_w is None and tile_l is None:
        return
    for what, tile, side in (
        ("width", tile_w, _tag_int(kind, 256)),
        ("length", tile_l, _tag_int(kind, 257)),
        ("depth", _tag_int(kind, 32998), _tag_int(kind, 32997) or 1),
    ):
        if tile is None or side is None:
            continue
        cap = side if what == "depth" else max(-(-side // 16) * 16, MAX_TIFF_TILE_SLACK)
        if tile > cap:
            raise UnsafeRecording(
                f"directory {index} has tiles of {what} {tile:,} for an image of {what} "
                f"{side:,}: every tile is decoded whole, far beyond the image (a damaged or "
                "crafted file); export the recording again"
            )


def _check_claimed(claimed: int, size: int) -> None:
    """Refuse a TIFF whose directories and out-of-line values claim more bytes than the file
    holds (:func:`count_tiff_pages`): they then overlap or are shared, and
    the walk and tifffile would read the same bytes over and over (4,096 directories each
    claiming 65,535 entries over one 786 kB stretch; every page's description at one 8 MB
    stretch). Stored apart, as every writer stores them, they fit in the file, so the walk
    reads each byte of the file at most once."""
    if claimed > size:
        raise UnsafeRecording(
            f"its image directories and their values claim more bytes than the file holds "
            f"(over {claimed:,} of {size:,}): parts are shared or overlap, so the reader would "
            "parse the same bytes again and again (a damaged or crafted file); export the "
            "recording again"
        )


def _shape_text(kinds: list[tuple]) -> str:
    """``'32 x 32, 33 x 32'``: width x length of page kinds (:func:`count_tiff_pages`: the
    values of :data:`_TIFF_SERIES_TAGS`, width and length first)."""
    return ", ".join(f"{w[0] if w else '?'} x {h[0] if h else '?'}" for w, h, *_ in kinds)


def check_jpeg_scans(fh: Any, limit: int | None = None) -> int:
    """Count a JPEG's scans (start-of-scan markers ``FF DA``) and refuse too many.

    A progressive JPEG may hold any number of scans, and the decoder passes over every block of
    the image once per scan: an 8192 x 8192 JPEG of 4,000 near-empty scans (531 kB) took
    19 s of the API's CPU at upload and again on every preview (a new user's attack run,
    2026-12-07); Pillow's decompression-bomb check counts only pixels. In entropy-coded data a
    ``FF`` byte is always followed by ``00`` or a marker, so every ``FF DA`` is a marker (an
    embedded thumbnail's scans count too: an overcount by a few).

    Args:
        fh: the open file (binary, seekable), read in 1 MiB blocks; its position is restored.
        limit: most scans accepted (default :data:`MAX_JPEG_SCANS`).

    Returns:
        The number of scans.

    Raises:
        UnsafeRecording: more than ``limit`` scans.
    """
    limit = MAX_JPEG_SCANS if limit is None else limit
    pos = fh.tell()
    try:
        fh.seek(0)
        n, tail = 0, b""
        while block := fh.read(1 << 20):
            data = tail + block
            n += data.count(b"\xff\xda")
            tail = data[-1:] if data[-1:] == b"\xff" else b""
            if n > limit:
                raise UnsafeRecording(
                    f"it is a JPEG of more than {limit:,} scans: the decoder passes over the "
                    "whole image once per scan (a progressive JPEG normally has under 20); "
                    "save it again as a baseline JPEG, or better as PNG or TIFF"
                )
        return n
    finally:
        fh.seek(pos)


def ome_foreign_files(xml: str, own_name: str) -> list[str]:
    """File names an OME-XML ``<TiffData><UUID FileName=...>`` points at, other than this file.

    A ``UUID`` equal to the document's own ``UUID`` attribute is this file whatever its
    ``FileName`` says (files are renamed on upload); without a document UUID, a single
    referenced UUID is taken as this file (a renamed single-file OME-TIFF), and several are a
    multi-file dataset. A ``FileName`` with a folder in it (``/``, ``\\``, ``..``, a drive)
    is always another file.

    Args:
        xml: the OME-XML of the first page.
        own_name: the file's own name.

    Returns:
        The other files' names (empty for a single-file OME-TIFF).
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return []
    own_uuid = root.get("UUID")
    refs: list[tuple[str, str]] = []
    for el in root.iter():
        if el.tag.endswith("}UUID") or el.tag == "UUID":
            refs.append(((el.text or "").strip(), el.get("FileName", "")))
    if not refs:
        return []
    if own_uuid:
        foreign = [name or uid for uid, name in refs if uid != own_uuid]
    elif len({uid for uid, _ in refs}) > 1:
        foreign = [name or uid for uid, name in refs if name != own_name]
    else:
        foreign = []
    # a name with a folder in it is never this file (OME writers store bare names)
    foreign += [name for _, name in refs if name != own_name and _has_folder(name)]
    return sorted(set(foreign))


def check_image_segments(fh: Any, fmt: str) -> None:
    """Refuse a JPEG or PNG whose headers Pillow would parse for long, walking them as Pillow
    does but only up to the caps.

    - JPEG: Pillow's header parse reads, in Python, every marker segment up to the first scan
      (SOS), and between segments every fill byte (``FF``), stuffed ``FF 00`` and junk byte
      one at a time. Refused: more than :data:`MAX_IMAGE_SEGMENTS` segments before the first
      scan, or more than :data:`MAX_JPEG_LOOSE_BYTES` bytes outside segments there. Measured:
      2.5 M empty APP segments, 10 MB: 7 s and 375 MB (a third attack run); 12.5 M empty APP
      segments placed after the frame header, which the walk once stopped at, 50 MB: 46 s and
      1.8 GB; 50 M fill bytes, 50 MB: 70 s (a fourth attack run, 2026-12-07).
    - PNG: Pillow reads every chunk header in Python, image data chunks too (empty ones are
      allowed). Refused: more than :data:`MAX_IMAGE_SEGMENTS` chunks other than image data,
      or more than that many image data chunks of under :data:`MIN_PNG_DATA_CHUNK` bytes:
      800,000 empty ancillary chunks, 9.6 MB: 5 s (third run); 4 M empty
      IDAT chunks, 48 MB: 8.2 s (fourth run). Encoders write IDAT chunks of 8-64 KiB.

    Args:
        fh: the open file (binary, seekable); its position is restored.
        fmt: ``"jpeg"`` or ``"png"``.

    Raises:
        UnsafeRecording: too many segments or chunks.
    """
    pos = fh.tell()
    n = 0
    try:
        if fmt == "jpeg":
            _check_jpeg_header(fh)
            return
        fh.seek(8)  # after the signature
        small = 0  # image data chunks of under MIN_PNG_DATA_CHUNK bytes
        while n <= MAX_IMAGE_SEGMENTS and small <= MAX_IMAGE_SEGMENTS:
            head = fh.read(8)
            if len(head) < 8:
                return
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IEND":
                return
            if kind not in (b"IDAT", b"fdAT"):
                n += 1
            elif length < MIN_PNG_DATA_CHUNK:
                small += 1
            fh.seek(length + 4, io.SEEK_CUR)  # data and CRC
        what = (
            "chunks besides the image data"
            if n > MAX_IMAGE_SEGMENTS
            else (f"image data chunks of under {MIN_PNG_DATA_CHUNK} bytes")
        )
        raise UnsafeRecording(
            f"it holds more than {MAX_IMAGE_SEGMENTS:,} {what} (the image reader parses each "
            "one in Python); save the image again"
        )
    finally:
        fh.seek(pos)


_JPEG_STANDALONE = {0x01, 0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)}
"""JPEG markers Pillow's header parse steps over without a length (TEM, JPG, RSTn, SOI, EOI,
JPGn): as ``PIL.JpegImagePlugin.MARKER``'s entries without a handler."""


def _check_jpeg_header(fh: Any) -> None:
    """Walk a JPEG from SOI to its first scan as Pillow's ``JpegImageFile._open`` does, and
    refuse it past :data:`MAX_IMAGE_SEGMENTS` segments or :data:`MAX_JPEG_LOOSE_BYTES` bytes
    outside segments (see :func:`check_image_segments`). A byte sequence Pillow would refuse
    ("no marker found") ends the walk: Pillow fails there, quickly."""
    fh.seek(2)  # after SOI
    n = loose = exif = 0
    while n <= MAX_IMAGE_SEGMENTS and loose <= MAX_JPEG_LOOSE_BYTES:
        b = fh.read(1)
        if not b:
            return
        if b[0] != 0xFF:  # junk between segments, skipped a byte at a time
            loose += 1
            continue
        m = fh.read(1)
        if not m:
            return
        marker = m[0]
        if marker == 0xFF:  # a fill byte: the second FF may start the marker
            loose += 1
            fh.seek(-1, io.SEEK_CUR)
        elif marker == 0x00:  # stuffed FF 00
            loose += 2
        elif marker in _JPEG_STANDALONE:
            n += 1
        elif 0xC0 <= marker <= 0xFE:  # a segment with a length (SOS: its header, then stop)
            n += 1
            if marker == 0xDA:
                return
            length = fh.read(2)
            if len(length) < 2:
                return
            skip = struct.unpack(">H", length)[0] - 2
            if marker == 0xE1 and skip >= 6:  # APP1: an EXIF segment?
                head = fh.read(6)
                exif += head == b"Exif\x00\x00"
                skip -= len(head)
                if exif > MAX_JPEG_EXIF_SEGMENTS:
                    raise UnsafeRecording(
                        f"it holds more than {MAX_JPEG_EXIF_SEGMENTS} EXIF segments (EXIF fits "
                        "in one; the image reader joins them one by one); save the image again"
                    )
            fh.seek(skip, io.SEEK_CUR)
        else:
            return
    what = (
        f"{MAX_IMAGE_SEGMENTS:,} marker segments"
        if n > MAX_IMAGE_SEGMENTS
        else f"{MAX_JPEG_LOOSE_BYTES:,} fill or stray bytes between its segments"
    )
    raise UnsafeRecording(
        f"it holds more than {what} before its first scan (the image reader parses its "
        "header a byte at a time in Python); save the image again"
    )


def check_ome_sizes(xml: str, limit: int | None = None, n_pages: int = 1) -> None:
    """Refuse OME-XML whose plane counts would make tifffile allocate far more than the file.

    tifffile sizes an OME series from the XML before reading a plane: it builds a list of
    ``SizeZ x SizeC x SizeT`` entries per image, and extends it by ``PlaneCount`` and the
    ``IFD`` / ``First*`` indices of each ``TiffData``. ``SizeT="268435456"`` in a 558-byte file
    took 20 s and 4.1 GB before CalSeg's budget check could refuse it (a second attack run,
    2026-12-07).

    Args:
        xml: the OME-XML of the first page.
        limit: most planes in all, and largest index (default :data:`MAX_TIFF_PAGES`).
        n_pages: the file's image directories (what a TiffData element without IFD,
            PlaneCount or NumPlanes maps).

    Raises:
        UnsafeRecording: a count or index over ``limit``.
    """
    limit = MAX_TIFF_PAGES if limit is None else limit
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return
    total = mapped = 0

    def number(el: Any, name: str) -> int:
        try:
            return max(int(el.get(name, "1" if name.startswith("Size") else "0")), 0)
        except ValueError:
            return 0

    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag == "Pixels":
            total += number(el, "SizeZ") * number(el, "SizeC") * number(el, "SizeT")
            what = f"{total:,} planes in all"
        elif tag == "TiffData":
            big = max(number(el, k) for k in ("IFD", "PlaneCount", "FirstZ", "FirstC", "FirstT"))
            what = f"a TiffData index or count of {big:,}"
            if big > limit:
                total = big
            # tifffile maps PlaneCount (else NumPlanes, else 1 with an IFD, else every page)
            # planes per element, one at a time: 40,000 elements without either over 4,000
            # pages (1.46 MB) took 103 s to probe (a fifth attack run, 2026-12-07)
            attrs = el.attrib
            count = next(
                (number(el, k) for k in ("PlaneCount", "NumPlanes") if k in attrs),
                1 if "IFD" in attrs else 0,
            )
            mapped += count or n_pages
            if mapped > limit and total <= limit:
                what = (
                    f"TiffData elements that map {mapped:,} planes in all (one with no IFD, "
                    f"PlaneCount or NumPlanes maps all {n_pages:,} pages)"
                )
                total = mapped
        else:
            continue
        if total > limit:
            raise UnsafeRecording(
                f"its OME-XML declares {what}, over the {limit:,} planes CalSeg reads from one "
                "TIFF (the reader would allocate for every one before reading any); export the "
                "recording again, or split it"
            )


def _has_folder(name: str) -> bool:
    return "/" in name or "\\" in name or name in (".", "..") or ":" in name


def _bounded_decode(
    more: Callable[[bytes, int], bytes],
    eof: Callable[[], bool],
    tail: Callable[[], bytes],
    data: bytes,
    limit: int,
    name: str,
    incomplete: type[Exception],
) -> bytes:
    """Decode at most ``limit`` bytes of one segment. A segment may legitimately hold up to
    ``limit`` bytes more (writers pad the last strip to full rows; tifffile drops the excess);
    one that expands beyond twice its declared size is refused."""
    out = more(data, limit)
    if len(out) < limit:
        if not eof():
            raise incomplete(f"incomplete or truncated {name} stream")
        return out
    if not eof() and len(more(tail(), limit + 1)) > limit:
        raise UnsafeRecording(
            f"a {name} segment expands beyond the {limit} bytes its image directory declares "
            "(a decompression bomb, or a damaged file); export the recording again"
        )
    return out


def _zlib_decode(data: bytes, /, *, out: Any = None) -> bytes:
    if not isinstance(out, int):
        return zlib.decompress(data)
    d = zlib.decompressobj()
    return _bounded_decode(
        d.decompress, lambda: d.eof, lambda: d.unconsumed_tail, data, out, "zlib/deflate",
        zlib.error,
    )  # fmt: skip


def _lzma_decode(data: bytes, /, *, out: Any = None) -> bytes:
    if not isinstance(out, int):
        return lzma.decompress(data)
    d = lzma.LZMADecompressor()
    return _bounded_decode(
        d.decompress, lambda: d.eof, lambda: b"", data, out, "LZMA", lzma.LZMAError
    )


def _packbits_decode(encoded: bytes, /, *, out: Any = None) -> bytes:
    """PackBits (TIFF 6.0 section 9) decoding that stops at ``out`` bytes."""
    limit = out if isinstance(out, int) else None
    res = bytearray()
    i, n_in = 0, len(encoded)
    if limit is not None and n_in > 2 * limit + (2 * limit) // 128 + 16:
        # the longest encoding of 2 x limit bytes (literal runs of 128, each after its count
        # byte); this loop is Python, 0.14 us an input byte: 20 MB of no-op bytes (0x80) in a
        # strip every page pointed at took 101 s to probe (a fifth attack run, 2026-12-07)
        raise UnsafeRecording(
            f"a PackBits segment of {n_in:,} bytes is longer than any encoding of the {limit:,} "
            "bytes its image directory declares (a damaged or crafted file); export the "
            "recording again"
        )
    while i < n_in:
        n = encoded[i] + 1
        i += 1
        if n > 129:  # a run: the next byte repeated 258 - n times
            res += encoded[i : i + 1] * (258 - n)
            i += 1
        elif n < 129:  # n literal bytes
            res += encoded[i : i + n]
            i += n
        if limit is not None and len(res) > 2 * limit:  # see _bounded_decode
            raise UnsafeRecording(
                f"a PackBits segment expands beyond the {limit} bytes its image directory "
                "declares (a damaged or crafted file); export the recording again"
            )
    return bytes(res)


_TIFF_CODECS: dict[int, Callable[..., bytes]] = {
    8: _zlib_decode,  # Adobe deflate
    32946: _zlib_decode,  # deflate
    50013: _zlib_decode,  # PixTiff deflate
    34925: _lzma_decode,
    32773: _packbits_decode,
}


def install_tiff_series_guard() -> bool:
    """Make tifffile skip its pyramid search (``pyramidize_series``) over more than
    :data:`MAX_TIFF_KINDS` series: it compares every series with every other one, and a file
    written one ``TiffWriter.write()`` per frame is one series per frame (20,000 frames of a
    6 MB file took 57 s to probe; 30,000 crafted pages 148 s: a fifth attack run,
    2026-12-07). A pyramid has a handful of levels; such files hold no pyramid to find.

    Returns:
        True when the guard is in place.
    """
    import tifffile.tifffile as tt

    original = getattr(tt, "pyramidize_series", None)
    if original is None or getattr(original, "_calseg_guard", False):
        return original is not None

    def pyramidize_series(series: list, /, **kwargs: Any) -> None:
        if len(series) > MAX_TIFF_KINDS:
            return None
        return original(series, **kwargs)

    pyramidize_series._calseg_guard = True  # type: ignore[attr-defined]
    tt.pyramidize_series = pyramidize_series
    return True


def install_bounded_tiff_codecs() -> bool:
    """Make tifffile decode zlib/deflate, LZMA and PackBits segments into at most their
    declared size (tifffile passes it as ``out``; its pure-Python fallbacks ignore it).

    Only codecs tifffile would take from its own pure-Python fallback are replaced; when the
    ``imagecodecs`` package is installed tifffile uses it, and imagecodecs honours ``out``.

    Returns:
        True when the codecs are in place (tifffile's codec table has the expected shape).
    """
    import tifffile

    try:
        table = tifffile.TIFF.DECOMPRESSORS
        codecs = table._codecs  # noqa: SLF001 - tifffile's cache of decode functions
    except AttributeError:
        return False
    if getattr(tifffile.tifffile, "imagecodecs", None) is not None and hasattr(
        tifffile.tifffile.imagecodecs, "__version__"
    ):
        return True  # the real imagecodecs: bounded by `out` already
    codecs.update(_TIFF_CODECS)
    return True


# --------------------------------------------------------------------------------------------
# HDF5


def no_hdf5_plugins() -> None:
    """Empty HDF5's filter-plugin search path in this process (``H5PLremove``), so no upload
    can make HDF5 load a shared library from it (default ``/usr/local/hdf5/lib/plugin``).
    Filters outside :data:`HDF5_FILTERS` are refused before any read anyway
    (:func:`check_hdf5_storage`); this closes the door behind that check. Idempotent."""
    from h5py import h5pl

    while h5pl.size():
        h5pl.remove(0)


def check_hdf5_file(h5: Any, limit: int | None = None) -> list[tuple[str, Any]]:
    """Refuse an HDF5 file whose links leave the file, before any dataset is opened; list its
    datasets.

    Walks the groups itself, depth first in name order (as HDF5's own visit), each group once
    (hard links may form cycles), at most :data:`MAX_HDF5_DEPTH` deep: HDF5's own visit
    re-resolves every object's path, so a chain of 3,000 nested groups (395 kB, under the
    link cap) took 111 s (a third attack run, 2026-12-07). Soft links are checked but not
    followed (what they name is reached by its hard link).

    Args:
        h5: an open ``h5py.File``.
        limit: most links visited (default :data:`MAX_HDF5_OBJECTS`).

    Returns:
        ``(path without the leading /, h5py.Dataset)`` of every dataset, in walk order
        (names sorted within each group). Opening a dataset reads no other file
        (:func:`check_hdf5_storage` checks where its data lies).

    Raises:
        UnsafeRecording: an external link, a user-defined link, more than ``limit`` links, or
            groups nested more than :data:`MAX_HDF5_DEPTH` deep.
    """
    import h5py

    limit = MAX_HDF5_OBJECTS if limit is None else limit
    bad: list[str] = []
    found: list[tuple[str, Any]] = []
    seen: set[int] = set()
    count = 0

    def walk(group: Any, prefix: str, depth: int) -> None:  # pre-order, names sorted
        nonlocal count
        addr = h5py.h5o.get_info(group.id).addr  # one group, one address (hard-link cycles)
        if addr in seen or bad:
            return
        seen.add(addr)
        if depth > MAX_HDF5_DEPTH:
            raise UnsafeRecording(
                f"its groups are nested more than {MAX_HDF5_DEPTH} deep (at /{prefix[:200]}); "
                "write the recording into a file of its own, with its dataset near the top"
            )
        for name in sorted(group.keys()):
            count += 1
            if count > limit:
                raise UnsafeRecording(
                    f"it holds more than {limit:,} HDF5 objects and links; write the "
                    "recording into a file of its own"
                )
            path = f"{prefix}{name}"
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                bad.append(f"/{path} is an external link to {link.filename}:{link.path}")
            elif not isinstance(link, h5py.HardLink | h5py.SoftLink):
                bad.append(f"/{path} is a user-defined link ({type(link).__name__})")
        if bad:
            return
        for name in sorted(group.keys()):
            if not isinstance(group.get(name, getlink=True), h5py.HardLink):
                continue  # a soft link: what it names is reached by its hard link
            obj = group.get(name)
            if isinstance(obj, h5py.Group):
                walk(obj, f"{prefix}{name}/", depth + 1)
            elif isinstance(obj, h5py.Dataset):
                found.append((f"{prefix}{name}", obj))

    walk(h5, "", 0)
    if bad:
        raise UnsafeRecording(
            f"the file holds links to other files ({'; '.join(bad[:3])}), whichever dataset "
            "is read: HDF5 external links are not accepted, since reading must stay inside the "
            "uploaded file; copy the data into the file (h5py: f['rec'] = other['rec'][()]) "
            "and upload that"
        )
    return found


def check_hdf5_storage(ds: Any, name: str) -> None:
    """Refuse a dataset whose data lies outside the file: a virtual dataset or external raw
    storage. Reads only the dataset's creation property list, never its extent.

    Call it on *every* dataset of an uploaded file before any dataset's ``shape``, ``ndim``,
    ``size`` or data is asked for: for a virtual dataset with an unlimited mapping, HDF5 opens
    the source files named in it to compute the extent (``H5Dget_space``, with the default
    ``H5D_VDS_LAST_AVAILABLE`` view), so listing the file's datasets with their shapes opened
    any path the file named and told its frame count (a new user's attack run, 2026-12-07;
    opening the dataset and its creation property list opens nothing else, checked with a
    FIFO as the source in ``tests/test_io_recordings.py``).

    Args:
        ds: an open ``h5py.Dataset``.
        name: its path, for messages.

    Raises:
        UnsafeRecording: a virtual dataset or external raw storage.
    """
    import h5py

    plist = ds.id.get_create_plist()
    layout = plist.get_layout()
    if layout == h5py.h5d.VIRTUAL:
        sources = []
        try:
            for i in range(min(plist.get_virtual_count(), 3)):
                sources.append(f"{plist.get_virtual_filename(i)}:{plist.get_virtual_dsetname(i)}")
        except Exception:  # noqa: BLE001 - only for the message
            pass
        raise UnsafeRecording(
            f"/{name} is an HDF5 virtual dataset (VDS) mapped from other files "
            f"({', '.join(sources) or 'sources unknown'}): not accepted, since reading must stay "
            "inside the uploaded file; write the data itself into the file and upload that"
        )
    n_ext = plist.get_external_count()
    if n_ext:
        target = plist.get_external(0)[0]
        target = target.decode(errors="replace") if isinstance(target, bytes) else str(target)
        raise UnsafeRecording(
            f"/{name} keeps its data in {n_ext} external file(s) (e.g. {target!r}): HDF5 "
            "external storage is not accepted, since reading must stay inside the uploaded "
            "file; write the data itself into the file and upload that"
        )


def check_hdf5_dataset(ds: Any, name: str) -> None:
    """Refuse a dataset whose data lies outside the file (:func:`check_hdf5_storage`) or needs a
    filter CalSeg does not check.

    Args:
        ds: an open ``h5py.Dataset``.
        name: its path, for messages.

    Raises:
        UnsafeRecording: external raw storage, a virtual dataset, more than
            :data:`MAX_HDF5_CHUNKS` tiny chunks, or a filter outside :data:`HDF5_FILTERS`.
    """
    import h5py

    check_hdf5_storage(ds, name)
    plist = ds.id.get_create_plist()
    layout = plist.get_layout()
    if layout == h5py.h5d.CHUNKED and ds.chunks is not None:
        n_chunks = math.prod(-(-int(n) // int(c)) for n, c in zip(ds.shape, ds.chunks, strict=True))
        chunk_bytes = _chunk_bytes(ds)
        if n_chunks > MAX_HDF5_CHUNKS and chunk_bytes < MIN_HDF5_CHUNK_BYTES:
            chunk = " x ".join(str(int(c)) for c in ds.chunks)
            raise UnsafeRecording(
                f"/{name} is stored in {n_chunks:,} chunks of {chunk} values ({chunk_bytes:,} "
                f"bytes each): HDF5 spends time and memory on every chunk, so more than "
                f"{MAX_HDF5_CHUNKS:,} chunks under {MIN_HDF5_CHUNK_BYTES:,} bytes are not "
                "accepted; re-save it with one frame per chunk (h5py: chunks=(1, height, width))"
            )
    if layout == h5py.h5d.CHUNKED:
        for i in range(plist.get_nfilters()):
            fid, _flags, _values, fname = plist.get_filter(i)
            if fid not in HDF5_FILTERS:
                label = fname.decode(errors="replace") if isinstance(fname, bytes) else fname
                raise UnsafeRecording(
                    f"/{name} is compressed with HDF5 filter {fid} ({label or 'unnamed'}), "
                    f"which CalSeg does not decode (accepted: {', '.join(HDF5_FILTERS.values())});"
                    " re-save it with compression='gzip' (h5py) or without compression"
                )


def _chunk_bytes(ds: Any) -> int:
    """Bytes of one chunk of an h5py dataset, decoded (the item size for a contiguous one)."""
    return math.prod(int(c) for c in ds.chunks or ()) * int(ds.dtype.itemsize)


def _chunks_hit(sel: int | slice, n: int, c: int) -> Sequence[int]:
    """Chunk indices along one dimension (length ``n``, chunks of ``c``) that ``sel`` (an int,
    or a slice with any positive step) touches, in order; empty for an empty slice."""
    if not isinstance(sel, slice):
        return [int(sel) // c]
    cells = range(*sel.indices(n))
    if not cells:
        return []
    if cells.step > c:  # sparse: only the chunks hit
        return sorted({i // c for i in cells})
    return range(cells[0] // c, cells[-1] // c + 1)


def hdf5_read_in_blocks(
    read: Callable[[tuple], Any], index: tuple, shape: tuple, chunks: tuple | None
) -> Any:
    """``read(index)``, split so that no call touches more than
    :data:`MAX_HDF5_CHUNKS_PER_READ` chunks (HDF5's per-chunk memory is held for a whole call).

    Args:
        read: reads one index of the dataset (e.g. ``lambda i: np.asarray(ds[i])``).
        index: one int or slice (any positive step) per dimension of the dataset.
        shape, chunks: the dataset's shape and chunk shape (``None``: contiguous).

    Returns:
        What ``read(index)`` gives: the parts (groups of whole chunk rows along the first
        dimension that spans several chunks, split further along the next one where one row
        is still too many) concatenated in order.
    """
    import numpy as np

    if chunks is None:
        return read(index)
    cells = [range(*sel.indices(n)) if isinstance(sel, slice) else None
             for sel, n in zip(index, shape, strict=True)]  # fmt: skip
    counts = [len(_chunks_hit(sel, n, c)) for sel, n, c in zip(index, shape, chunks, strict=True)]
    total = math.prod(counts)
    axis = next((i for i, r in enumerate(cells) if r is not None and counts[i] > 1), None)
    if total <= MAX_HDF5_CHUNKS_PER_READ or axis is None:
        return read(index)
    rows = max(1, MAX_HDF5_CHUNKS_PER_READ // (total // counts[axis]))
    c = int(chunks[axis])
    r = cells[axis]
    parts, group, first_row = [], [], None
    for i in [*r, None]:  # positions grouped by chunk row, ``rows`` rows at a time
        if i is not None and (first_row is None or i // c < first_row + rows):
            first_row = i // c if first_row is None else first_row
            group.append(i)
            continue
        sub = list(index)
        sub[axis] = slice(group[0], group[-1] + 1, r.step)
        parts.append(hdf5_read_in_blocks(read, tuple(sub), shape, chunks))
        group, first_row = ([i], i // c) if i is not None else ([], None)
    out_axis = sum(1 for x in cells[:axis] if x is not None)  # ints drop their dimension
    return np.concatenate(parts, axis=out_axis)


class Hdf5ChunkGuard:
    """Verify, before HDF5 decodes them, that a chunked dataset's deflate streams expand to at
    most the chunk size (HDF5's deflate filter grows its buffer without a limit).

    Verified chunks are remembered, so each is checked once per open file. Costs one extra
    bounded decompression of each chunk read.
    """

    def __init__(self, ds: Any, name: str) -> None:
        self.ds = ds
        self.name = name
        plist = ds.id.get_create_plist()
        self.filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
        self.active = 1 in self.filters and ds.chunks is not None
        self.chunk_bytes = _chunk_bytes(ds)
        self.verified: set[tuple[int, ...]] = set()

    def check(self, index: tuple) -> None:
        """Verify the chunks that ``index`` (a tuple of ints and slices, one per dimension)
        touches."""
        if not self.active:
            return
        ranges = [
            _chunks_hit(sel, n, c)
            for sel, n, c in zip(index, self.ds.shape, self.ds.chunks, strict=True)
        ]
        if not all(ranges):  # an empty slice reads nothing
            return
        for coord in _product(ranges):
            offset = tuple(i * c for i, c in zip(coord, self.ds.chunks, strict=True))
            if offset not in self.verified:
                self._verify(offset)
                self.verified.add(offset)

    def _verify(self, offset: tuple[int, ...]) -> None:
        try:
            info = self.ds.id.get_chunk_info_by_coord(offset)
        except Exception:  # noqa: BLE001 - no such chunk: HDF5 uses the fill value
            return
        if info.byte_offset is None or not info.size:
            return
        mask, raw = self.ds.id.read_direct_chunk(offset)
        data = raw
        limit = self.chunk_bytes + 4 * len(self.filters)
        for i in reversed(range(len(self.filters))):
            if mask & (1 << i):
                continue  # this filter was skipped for this chunk
            fid = self.filters[i]
            if fid == 3:  # fletcher32: a 4-byte checksum at the end
                data = data[:-4]
            elif fid == 1:
                d = zlib.decompressobj()
                out = d.decompress(data, limit)
                if d.unconsumed_tail and d.decompress(d.unconsumed_tail, 1):
                    raise UnsafeRecording(
                        f"/{self.name}: the chunk at {offset} expands beyond the chunk size of "
                        f"{self.chunk_bytes} bytes (a decompression bomb, or a damaged file); "
                        "write the recording again"
                    )
                data = out
        if len(data) > limit:
            raise UnsafeRecording(
                f"/{self.name}: the chunk at {offset} decodes to {len(data)} bytes, more than "
                f"the chunk size of {self.chunk_bytes} bytes (a damaged or crafted file)"
            )


def _product(ranges: list[Iterable[int]]) -> Iterable[tuple[int, ...]]:
    import itertools

    return itertools.product(*ranges)


# --------------------------------------------------------------------------------------------
# Video


def sniff_video_format(head: bytes) -> str | None:
    """The FFmpeg demuxer for a video's first 16 bytes, or None when it is not a container
    CalSeg opens (:data:`VIDEO_FORMATS`): RIFF/AVI, ISO-BMFF/QuickTime (``ftyp``, ``moov``,
    ``mdat``, ``wide``, ``free``, ``skip`` atoms), Matroska/WebM (EBML), ASF/WMV."""
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"):
        return "mov"
    if head[:4] == b"\x1aE\xdf\xa3":
        return "matroska"
    if head[:16] == bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c"):
        return "asf"
    return None


_MOV_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"dinf", b"edts", b"meta"}


def _mov_boxes(fh: Any, start: int, end: int, budget: list[int]) -> Iterator[tuple]:
    """``(type, body start, end)`` of the ISO-BMFF/QuickTime boxes in ``[start, end)``, at most
    ``budget[0]`` in all (decremented)."""
    off = start
    while off + 8 <= end and budget[0] > 0:
        budget[0] -= 1
        fh.seek(off)
        head = fh.read(16)
        if len(head) < 8:
            return
        n, typ = struct.unpack(">I4s", head[:8])
        body = off + 8
        if n == 1 and len(head) >= 16:
            n, body = struct.unpack(">Q", head[8:16])[0], off + 16
        elif n == 0:
            n = end - off
        if n < 8 or off + n > end:
            return
        yield typ, body, off + n
        off += n


def mov_data_references(fh: Any, size: int, max_boxes: int = 100_000) -> list[str]:
    """The data references of an MP4/MOV (ISO-BMFF/QuickTime) that point outside the file.

    Each track's ``dref`` box lists where its samples are: ``url ``/``urn `` entries with flag
    1 are "this file"; any other entry (an ``alis`` Macintosh alias with a path, a URL) names
    another file, which FFmpeg opens when ``enable_drefs`` is on. Walks the box tree of
    ``moov`` only (headers; no sample is read).

    Args:
        fh: the open file (binary, seekable); its position is restored.
        size: the file size in bytes.
        max_boxes: most boxes visited.

    Returns:
        A description of each external reference (type and, when readable, the name).
    """
    pos = fh.tell()
    found: list[str] = []
    budget = [max_boxes]

    def walk(start: int, end: int) -> None:
        for typ, body, stop in _mov_boxes(fh, start, end, budget):
            if typ in _MOV_CONTAINERS:
                walk(body + (4 if typ == b"meta" else 0), stop)
            elif typ == b"dref":
                for etyp, ebody, estop in _mov_boxes(fh, body + 8, stop, budget):
                    fh.seek(ebody)
                    flags = int.from_bytes(fh.read(4)[1:4], "big")
                    if etyp in (b"url ", b"urn ") and flags & 1:
                        continue
                    raw = fh.read(min(estop - ebody - 4, 512))
                    text = "".join(chr(b) for b in raw if 32 <= b < 127)[:120]
                    found.append(f"{etyp.decode(errors='replace').strip()} {text!r}")

    try:
        for typ, body, stop in _mov_boxes(fh, 0, size, budget):
            if typ == b"moov":
                walk(body, stop)
    finally:
        fh.seek(pos)
    return found


_MOV_SAMPLE_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"moof", b"traf"}


def mov_sample_count(fh: Any, size: int, max_boxes: int = 100_000) -> int:
    """Samples an MP4/MOV declares, in all tracks: the ``sample_count`` of every ``stsz`` /
    ``stz2`` (sample sizes) and ``trun`` (fragment runs) box.

    FFmpeg builds an index entry for every declared sample while it opens the file, and a
    ``stsz`` with one constant sample size, or a ``trun`` without per-sample fields, declares
    any count without a table: 975 bytes claiming 6e7 samples took FFmpeg to 4.1 GB inside
    ``av.open`` (a second attack run, 2026-12-07). Counted from the box headers, before FFmpeg
    opens the file.

    Args:
        fh: the open file (binary, seekable); its position is restored.
        size: the file size in bytes.
        max_boxes: most boxes visited.
    """
    pos = fh.tell()
    total = 0
    budget = [max_boxes]

    def walk(start: int, end: int) -> None:
        nonlocal total
        for typ, body, stop in _mov_boxes(fh, start, end, budget):
            if typ in _MOV_SAMPLE_CONTAINERS:
                walk(body, stop)
            elif typ in (b"stsz", b"stz2", b"trun"):
                fh.seek(body)
                raw = fh.read(12)
                at = {b"stsz": 8, b"stz2": 8, b"trun": 4}[typ]
                if len(raw) >= at + 4:
                    total += struct.unpack(">I", raw[at : at + 4])[0]

    try:
        walk(0, size)
    finally:
        fh.seek(pos)
    return total


def open_video(path: Path, fmt: str, max_frame_pixels: int | None = None) -> Any:
    """Open a video with PyAV, confined to the file.

    The file is passed as a Python file object (so FFmpeg's own I/O never opens a path), the
    demuxer is fixed (no content probing: a playlist, ``ffconcat`` list or SDP file is never
    parsed as one), nested opens are refused (``protocol_whitelist=none``) and QuickTime data
    references are off (``enable_drefs=0``).

    FFmpeg decodes a first frame while it reads the header (``avformat_find_stream_info``);
    ``max_frame_pixels`` is passed to the decoders as ``max_pixels``, so no frame larger than
    that is allocated, then or later (FFmpeg's own cap is about 2^28 pixels a frame).

    Args:
        path: the video file.
        fmt: a key of :data:`VIDEO_FORMATS` (from :func:`sniff_video_format`).
        max_frame_pixels: largest frame (rows x columns) any decoder may allocate; None =
            FFmpeg's own limit.

    Returns:
        The open ``av.container.InputContainer``; close it (it closes the file too).
    """
    import av

    if fmt not in VIDEO_FORMATS:
        raise UnsafeRecording(f"container format {fmt!r} is not accepted")
    fh = open(path, "rb")  # noqa: SIM115 - owned by the container (closed with it)
    # max_streams: FFmpeg decodes a packet of every stream while it reads the header, and a
    # PNG stream allocates the frame its header declares: 8 such streams in 2 kB took 2.2 GB,
    # and streams past the options' list got FFmpeg's own 2^28 px cap (16 kB: 4.1 GB; a third
    # attack run, 2026-12-07). More streams than MAX_VIDEO_STREAMS: FFmpeg refuses the file.
    options = {
        "protocol_whitelist": "none",
        "format_whitelist": fmt,
        "max_streams": str(MAX_VIDEO_STREAMS),
    }
    if fmt == "mov":
        options.update(enable_drefs="0", use_absolute_path="0")
    per_stream = (
        [{"max_pixels": str(int(max_frame_pixels))}] * MAX_VIDEO_STREAMS
        if max_frame_pixels
        else None
    )
    try:
        container = av.open(
            fh, mode="r", format=fmt, options=options, stream_options=per_stream,
            metadata_errors="ignore",
        )  # fmt: skip
    except BaseException:
        fh.close()
        raise
    return _ClosingContainer(container, fh)


class _ClosingContainer:
    """A PyAV container whose ``close`` also closes the file object it reads."""

    def __init__(self, container: Any, fh: Any) -> None:
        self._c, self._fh = container, fh

    def __getattr__(self, name: str) -> Any:
        return getattr(self._c, name)

    def close(self) -> None:
        try:
            self._c.close()
        finally:
            self._fh.close()
