"""DICOM CT studies: read a study folder into an HU volume (head -> feet).

Reading (``load_study``) is the hot path of the pipeline:

1. every ``<n>.dcm`` header is read with pydicom (``stop_before_pixels``, ~0.2 ms a file) and the
   pixel-data element is checked to be structurally complete (see ``SliceHeader.pixels_complete``);
2. slices are ordered by ImagePositionPatient projected on the slice normal, oriented head -> feet
   (file names and InstanceNumber are never used for ordering), exact-duplicate positions dropped;
3. JPEG Lossless slices are decoded by imagecodecs (libjpeg-turbo: ~1.6x dicomsdl's speed per
   core on 512x512 CT), others by dicomsdl, with pydicom as the per-slice fallback. pydicom is the
   only decoder given a file whose pixel data is incomplete: dicomsdl 0.109.4 kills the
   interpreter with SIGSEGV on such a file. Every decoder's stored values go through the same bit
   clean-up and float32 rescale, so all backends give bit-identical HU volumes.

Decoding threads (``load_study(..., threads=n)``) help only where cores are idle: imagecodecs
releases the GIL (raw decode: 2 threads = 2.1x while the machine was idle) but dicomsdl does not; on the
shared 2-core machine 2 threads were slower than 1 whenever another process was busy, so the
default is 1.

A slice that cannot be decoded (or whose size differs from the study's) is logged, listed in
``Study.skipped`` and filled from its nearest decoded neighbour. A file whose header cannot be
read has no position of its own: when the readable files' numbers map linearly onto their
positions (as in every RSNA study), it keeps the place its number gives it and is filled the same
way, so the slice count still pairs with a segmentation; otherwise it is logged and dropped.
"""

from __future__ import annotations

import logging
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import dicomsdl
import imagecodecs
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    ImplicitVRLittleEndian,
    JPEGLossless,
    JPEGLosslessSV1,
)

log = logging.getLogger(__name__)

BONE_WINDOW: tuple[float, float] = (400.0, 1800.0)  # (center, width) HU

BACKENDS = ("auto", "dicomsdl", "pydicom")

# Slices whose positions along the normal agree within this distance (mm) are the same slice
# stored twice; real spacings are >= 0.2 mm.
DUPLICATE_TOLERANCE_MM = 1e-3

_IMAGECODECS_SYNTAXES = frozenset({JPEGLossless, JPEGLosslessSV1})
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
_ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000)
_SEQUENCE_DELIMITER_TAG = b"\xfe\xff\xdd\xe0"  # (FFFE,E0DD)
_UNDEFINED_LENGTH = 0xFFFFFFFF


class StudyReadError(RuntimeError):
    """A study folder is missing, empty, or holds no decodable slice."""


@dataclass(frozen=True)
class SliceHeader:
    """What ``load_study`` needs from one file, read without decoding its pixels.

    ``position``: (3,) float64 mm, ImagePositionPatient (DICOM LPS). ``orientation``: (6,) float64,
    ImageOrientationPatient (row then column direction cosines). ``pixels_complete``: the pixel-data
    element is little endian and whole (defined length covering every pixel, or an encapsulated
    fragment sequence ending with its delimiter inside the file): only then may dicomsdl open it.
    ``fragments``: (file offset, byte length) of each encapsulated pixel fragment (the basic offset
    table excluded) when complete, else empty.
    """

    path: Path
    rows: int
    cols: int
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_thickness: float | None
    slope: float
    intercept: float
    bits_stored: int
    signed: bool
    transfer_syntax: str
    pixels_complete: bool
    fragments: tuple[tuple[int, int], ...]

    @property
    def normal(self) -> np.ndarray:
        """(3,) float64 unit slice normal: row cosines x column cosines."""
        n = np.cross(self.orientation[:3], self.orientation[3:])
        return n / np.linalg.norm(n)


@dataclass
class Study:
    """One CT study as an HU volume ordered head -> feet.

    ``hu``: (Z, H, W) float32 HU. ``file_numbers``: (Z,) int64, n of ``<n>.dcm`` per slice of ``hu``.
    ``positions``: (Z,) float64 mm, IPP projected on the feet-ward unit slice normal, so it increases
    strictly along the volume. ``reversed``: ascending file numbers run feet -> head.
    ``z_spacing``: mm, median gap between consecutive kept slices (SliceThickness for a one-slice
    study). ``pixel_spacing``: (row, col) mm. ``skipped``: file numbers whose pixels could not be
    decoded (filled from the nearest decoded neighbour) or whose header was unreadable (dropped).
    ``n_duplicates``: slices dropped because their position duplicated another's.
    """

    uid: str
    hu: np.ndarray
    file_numbers: np.ndarray
    positions: np.ndarray
    reversed: bool
    z_spacing: float
    pixel_spacing: tuple[float, float]
    transfer_syntaxes: tuple[str, ...]
    n_files: int
    skipped: tuple[int, ...]
    n_duplicates: int

    @property
    def rows(self) -> int:
        return int(self.hu.shape[1])

    @property
    def cols(self) -> int:
        return int(self.hu.shape[2])

    @property
    def n_slices(self) -> int:
        return int(self.hu.shape[0])


# ---- windows ------------------------------------------------------------------------------------
def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map HU linearly from [center - width/2, center + width/2] to [0, 255], clipped.

    ``hu``: any shape, float HU -> same shape uint8.
    """
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    low = center - width / 2
    scaled = (np.asarray(hu, dtype=np.float32) - np.float32(low)) * np.float32(255.0 / width)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def multi_window(hu: np.ndarray, windows: Sequence[tuple[float, float]]) -> np.ndarray:
    """Stack several ``window`` results as channels: (...) HU -> (..., len(windows)) uint8."""
    return np.stack([window(hu, c, w) for c, w in windows], axis=-1)


# ---- headers ------------------------------------------------------------------------------------
def read_header(path: str | Path) -> SliceHeader:
    """Read one slice's header (no pixel decoding); ``ValueError`` naming the file if unusable."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            # pydicom leaves the file at the pixel-data tag when it stops before the pixels.
            pixel_offset = f.tell()
            ts = str(ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian))
            complete, fragments = _pixel_data_layout(f, pixel_offset, ds, ts)
        return SliceHeader(
            path=path,
            rows=int(ds.Rows),
            cols=int(ds.Columns),
            position=np.array([float(v) for v in ds.ImagePositionPatient], dtype=np.float64),
            orientation=_orientation(ds),
            pixel_spacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
            slice_thickness=float(ds.SliceThickness) if ds.get("SliceThickness") else None,
            slope=float(ds.get("RescaleSlope", 1.0)),
            intercept=float(ds.get("RescaleIntercept", 0.0)),
            bits_stored=int(ds.BitsStored),
            signed=int(ds.PixelRepresentation) == 1,
            transfer_syntax=ts,
            pixels_complete=complete,
            fragments=fragments,
        )
    except Exception as err:  # pydicom raises many types on damaged headers
        raise ValueError(f"{path}: unreadable DICOM header ({type(err).__name__}: {err})") from err


def _orientation(ds: Dataset) -> np.ndarray:
    """(6,) float64 ImageOrientationPatient; rejects a missing or degenerate one."""
    iop = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
    if iop.shape != (6,) or np.linalg.norm(np.cross(iop[:3], iop[3:])) < 0.5:
        raise ValueError(f"bad ImageOrientationPatient {iop.tolist()}")
    return iop


def _pixel_data_layout(
    f, offset: int, ds: Dataset, transfer_syntax: str
) -> tuple[bool, tuple[tuple[int, int], ...]]:
    """Whether the pixel-data element at ``offset`` is little endian and whole, and its fragments.

    Defined length: the value must hold Rows x Columns x frames x samples x BitsAllocated/8 bytes
    and end inside the file. Undefined length (encapsulated): every item must fit in the file and
    the fragment sequence must end with its delimiter after at least one fragment.
    """
    incomplete = (False, ())
    if transfer_syntax == pydicom.uid.ExplicitVRBigEndian or "BitsAllocated" not in ds:
        return incomplete
    f.seek(0, 2)
    size = f.tell()
    f.seek(offset)
    head = f.read(12)
    if len(head) < 8 or head[:4] != _PIXEL_DATA_TAG:
        return incomplete
    if transfer_syntax == ImplicitVRLittleEndian:
        (length,), value_start = struct.unpack("<I", head[4:8]), offset + 8
    else:
        if len(head) < 12:
            return incomplete
        (length,), value_start = struct.unpack("<I", head[8:12]), offset + 12
    if length != _UNDEFINED_LENGTH:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1))
        expected = -(
            -int(ds.Rows) * int(ds.Columns) * frames * samples * int(ds.BitsAllocated) // 8
        )
        return expected <= length and value_start + length <= size, ()
    fragments = _complete_fragments(f, value_start, size)
    return (True, fragments) if fragments else incomplete


def _complete_fragments(f, start: int, size: int) -> tuple[tuple[int, int], ...]:
    """(offset, length) of the fragments of the item sequence at ``start``, after its basic offset
    table; empty unless every item fits in the file and the sequence ends with its delimiter."""
    position, items = start, []
    while position + 8 <= size:
        f.seek(position)
        tag, (length,) = f.read(4), struct.unpack("<I", f.read(4))
        if tag == _SEQUENCE_DELIMITER_TAG:
            return tuple(items[1:])
        if tag != _ITEM_TAG or length == _UNDEFINED_LENGTH or position + 8 + length > size:
            return ()
        items.append((position + 8, length))
        position += 8 + length
    return ()


# ---- geometry -----------------------------------------------------------------------------------
def _feetward_normal(headers: Sequence[SliceHeader]) -> np.ndarray:
    """(3,) unit slice normal of the study, pointing to the feet (patient z decreasing in LPS).

    The component-wise median of the per-slice normals resists a few odd slices. A stack with no
    patient-z component (sagittal/coronal) keeps the cross-product direction.
    """
    normal = np.median(np.stack([h.normal for h in headers]), axis=0)
    normal /= np.linalg.norm(normal)
    return -normal if normal[2] > 0 else normal


def _order_slices(
    positions: np.ndarray, file_numbers: np.ndarray, preferred: np.ndarray
) -> tuple[np.ndarray, int]:
    """Volume order of the slices and the number of duplicates dropped.

    ``positions``: (N,) float64 mm along the feet-ward normal; ``file_numbers``: (N,) int64;
    ``preferred``: (N,) bool, slices to keep first among copies of one position (then the lowest
    file number). Returns (K,) int64 indices into the inputs, positions strictly increasing.
    """
    order = np.lexsort((file_numbers, ~preferred, positions))
    kept = np.concatenate([[True], np.diff(positions[order]) > DUPLICATE_TOLERANCE_MM])
    return order[kept], int((~kept).sum())


def _positions_from_numbers(
    positions: np.ndarray, numbers: Sequence[int], missing: Sequence[int]
) -> np.ndarray | None:
    """(M,) positions of the ``missing`` file numbers from the readable files' number -> position
    line, or None when the numbering does not follow the positions (then they cannot be placed).

    ``positions``: (N,) mm along the slice normal of the readable files, ``numbers`` their (N,)
    file numbers. A line fits when every residual is under a quarter of the slice gap.
    """
    if len(positions) < 2 or not missing:
        return None
    slope, offset = np.polyfit(np.asarray(numbers, float), positions, 1)
    gap = np.median(np.abs(np.diff(np.sort(positions))))
    residual = np.abs(positions - (slope * np.asarray(numbers, float) + offset))
    if gap <= 0 or abs(slope) < 0.5 * gap or residual.max() > 0.25 * gap:
        return None
    return slope * np.asarray(missing, float) + offset


def _nearest(bad: np.ndarray, good: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """For each index in ``bad``, the index in ``good`` whose position is closest (head side wins)."""
    distance = np.abs(positions[bad][:, None] - positions[good][None, :])
    return good[np.argmin(distance, axis=1)]


# ---- decoding -----------------------------------------------------------------------------------
def _decode_imagecodecs(header: SliceHeader) -> np.ndarray:
    """Stored values (rows, cols) of a complete JPEG Lossless file via libjpeg-turbo."""
    parts = []
    with open(header.path, "rb") as f:
        for offset, length in header.fragments:
            f.seek(offset)
            parts.append(f.read(length))
    return imagecodecs.jpeg8_decode(b"".join(parts))


def _decode_dicomsdl(header: SliceHeader) -> np.ndarray:
    """Stored values (rows, cols) of a file whose pixel data is complete."""
    if not header.pixels_complete:
        raise ValueError("pixel data incomplete; not safe for dicomsdl")
    dataset = dicomsdl.open(str(header.path))
    info = dataset.getPixelDataInfo()
    if info["NumberOfFrames"] != 1 or info["SamplesPerPixel"] != 1:
        raise ValueError("not a single-frame grayscale image")
    stored = np.empty((info["Rows"], info["Cols"]), dtype=info["dtype"])
    dataset.copyFrameData(0, stored)
    return stored


def _decode_pydicom(header: SliceHeader) -> np.ndarray:
    """Stored values (rows, cols) of one file via pydicom and its gdcm / pylibjpeg plugins."""
    return pydicom.dcmread(header.path).pixel_array


def _decoders(header: SliceHeader, backend: str) -> tuple[Callable[[SliceHeader], np.ndarray], ...]:
    """Decoders to try in turn for one slice."""
    if backend != "auto":
        return ({"dicomsdl": _decode_dicomsdl, "pydicom": _decode_pydicom}[backend],)
    fast = header.transfer_syntax in _IMAGECODECS_SYNTAXES and header.pixels_complete
    return ((_decode_imagecodecs,) if fast else ()) + (_decode_dicomsdl, _decode_pydicom)


def _decode(header: SliceHeader, backend: str) -> np.ndarray:
    """Stored values (rows, cols), signed per PixelRepresentation, from the first decoder of
    ``backend`` that succeeds; ``ValueError`` listing every decoder's error otherwise."""
    errors = []
    for decoder in _decoders(header, backend):
        try:
            stored = decoder(header)
            if stored.shape != (header.rows, header.cols) or stored.dtype.itemsize > 2:
                raise ValueError(
                    f"decoded {stored.dtype} {stored.shape}; "
                    f"header: {header.rows}x{header.cols}, at most 16 bits"
                )
            return _clean_stored(stored, header.bits_stored, header.signed)
        except Exception as err:  # decoder plugins raise many types on corrupt streams
            errors.append(f"{decoder.__name__}: {type(err).__name__}: {err}")
            log.debug("%s: %s", header.path, errors[-1])
    raise ValueError("; ".join(errors))


def _clean_stored(stored: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Stored values as signed/unsigned per PixelRepresentation, with the bits above BitsStored
    sign-extended (signed) or cleared (unsigned).

    pydicom's ``pixel_array`` does this; dicomsdl keeps those bits and imagecodecs returns unsigned
    integers, so every decoder's output goes through here (idempotent) to stay bit-identical. The
    DICOM standard says the bits above BitsStored are not pixel data.
    """
    stored = stored.view(f"{'i' if signed else 'u'}{stored.dtype.itemsize}")
    unused = stored.dtype.itemsize * 8 - bits_stored
    if unused <= 0:
        return stored
    if signed:
        return (stored << unused) >> unused
    return stored & ((1 << bits_stored) - 1)


def _rescale_into(out: np.ndarray, stored: np.ndarray, slope: float, intercept: float) -> None:
    """out (rows, cols) float32 HU = stored * slope + intercept, in float32 for every backend."""
    if slope == 1.0:
        out[...] = stored
    else:
        np.multiply(stored, np.float32(slope), out=out, casting="unsafe")
    out += np.float32(intercept)


# ---- study --------------------------------------------------------------------------------------
def _list_slices(study_dir: Path) -> tuple[list[tuple[int, Path]], int]:
    """(file number, path) of every ``<n>.dcm`` sorted by number, and the count of .dcm files."""
    if not study_dir.is_dir():
        raise StudyReadError(f"study {study_dir}: folder not found")
    found = sorted(study_dir.glob("*.dcm"))
    numbered = []
    for path in found:
        if path.stem.isascii() and path.stem.isdigit():
            numbered.append((int(path.stem), path))
        else:
            log.warning(
                "study %s: skipping %s (file name is not <number>.dcm)", study_dir, path.name
            )
    if not numbered:
        raise StudyReadError(f"study {study_dir}: no <number>.dcm files")
    return sorted(numbered), len(found)


def _read_headers(
    study_dir: Path, files: list[tuple[int, Path]]
) -> tuple[list[SliceHeader], list[int], list[int]]:
    """Headers and file numbers of readable files, and the numbers of unreadable ones."""
    headers, numbers, unreadable = [], [], []
    for number, path in files:
        try:
            headers.append(read_header(path))
            numbers.append(number)
        except ValueError as err:
            log.warning("study %s: slice %d header unreadable: %s", study_dir, number, err)
            unreadable.append(number)
    if not headers:
        raise StudyReadError(f"study {study_dir}: no readable DICOM header")
    return headers, numbers, unreadable


def load_study(study_dir: str | Path, backend: str = "auto", threads: int = 1) -> Study:
    """Read every ``<n>.dcm`` of ``study_dir`` into a head -> feet float32 HU volume.

    ``backend``: "auto" (imagecodecs for JPEG Lossless, else dicomsdl, then pydicom for a slice the
    first cannot take), "dicomsdl" or "pydicom" (one decoder only). ``threads``: decoding threads,
    worth more than 1 only with idle cores (see the module docstring). Raises
    ``StudyReadError`` naming the folder when it is missing or empty or when no slice decodes.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    study_dir = Path(study_dir)
    files, n_files = _list_slices(study_dir)
    headers, numbers, unreadable = _read_headers(study_dir, files)

    shape = Counter((h.rows, h.cols) for h in headers).most_common(1)[0][0]
    normal = _feetward_normal(headers)
    all_positions = np.array([h.position @ normal for h in headers])
    preferred = [(h.rows, h.cols) == shape and h.pixels_complete for h in headers]
    placed = _positions_from_numbers(all_positions, numbers, unreadable)
    slots: list[SliceHeader | None] = list(headers)
    if placed is not None:  # unreadable headers keep their place, filled below
        slots += [None] * len(unreadable)
        numbers = [*numbers, *unreadable]
        all_positions = np.concatenate([all_positions, placed])
        preferred += [False] * len(unreadable)
    elif unreadable:
        log.warning(
            "study %s: file numbers do not follow positions; dropped unreadable slices %s",
            study_dir,
            unreadable,
        )
    order, n_duplicates = _order_slices(
        all_positions, np.asarray(numbers, dtype=np.int64), np.array(preferred)
    )
    if n_duplicates:
        log.warning("study %s: dropped %d slices with duplicate positions", study_dir, n_duplicates)
    kept = [slots[i] for i in order]
    file_numbers = np.asarray(numbers, dtype=np.int64)[order]
    positions = all_positions[order]

    hu = np.empty((len(kept), *shape), dtype=np.float32)
    errors = _decode_into(hu, kept, backend, threads)
    failed = [k for k, err in enumerate(errors) if err]
    for k in failed:
        log.warning("study %s: slice %d not decoded: %s", study_dir, file_numbers[k], errors[k])
    if len(failed) == len(kept):
        raise StudyReadError(f"study {study_dir}: no slice could be decoded")
    if failed:
        bad = np.asarray(failed)
        hu[bad] = hu[_nearest(bad, np.setdiff1d(np.arange(len(kept)), bad), positions)]
    readable = [h for h in kept if h is not None]

    return Study(
        uid=study_dir.name,
        hu=hu,
        file_numbers=file_numbers,
        positions=positions,
        reversed=bool(file_numbers[0] > file_numbers[-1]),
        z_spacing=_z_spacing(positions, readable[0]),
        pixel_spacing=Counter(h.pixel_spacing for h in readable).most_common(1)[0][0],
        transfer_syntaxes=tuple(sorted({h.transfer_syntax for h in headers})),
        n_files=n_files,
        skipped=tuple(sorted({*unreadable, *(int(file_numbers[k]) for k in failed)})),
        n_duplicates=n_duplicates,
    )


def _decode_into(
    hu: np.ndarray, headers: Sequence[SliceHeader | None], backend: str, threads: int
) -> list[str]:
    """Decode ``headers[k]`` into ``hu[k]`` ((Z, H, W) float32 HU); per slice, "" or the error.

    A None header is a placed slice whose header was unreadable. Threads pay off only for
    decoders that release the GIL (imagecodecs; numpy's rescale too).
    """

    def decode_one(k: int) -> str:
        header = headers[k]
        if header is None:
            return "header unreadable"
        if (header.rows, header.cols) != hu.shape[1:]:
            return f"size {header.rows}x{header.cols}, study is {hu.shape[1]}x{hu.shape[2]}"
        try:
            _rescale_into(hu[k], _decode(header, backend), header.slope, header.intercept)
        except ValueError as err:
            return str(err)
        return ""

    if threads <= 1:
        return [decode_one(k) for k in range(len(headers))]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(decode_one, range(len(headers))))


def _z_spacing(positions: np.ndarray, header: SliceHeader) -> float:
    """Median gap (mm) between consecutive positions; the slice thickness for a single slice."""
    if len(positions) > 1:
        return float(np.median(np.diff(positions)))
    if header.slice_thickness is None:
        raise StudyReadError(f"{header.path}: one slice without SliceThickness, z spacing unknown")
    return header.slice_thickness
