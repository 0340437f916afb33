"""Writers of the competition's file formats for synthetic data: DICOM CT slices and RSNA-style
segmentation NIfTI files (the readers they must satisfy: utils/rsna/dicom.py, utils/rsna/nifti.py).

``write_slice`` produces deterministic Part-10 CT files in five lossless transfer syntaxes;
``save_rsna_seg`` stores labels the way the competition's ``segmentations/<uid>.nii`` are stored.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from utils.io import atomic_path
from utils.rsna.dicom import BONE_WINDOW
from utils.rsna.nifti import as_labels

TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "jpeg_lossless": JPEGLosslessSV1,
    "rle": RLELossless,
    "jpeg_ls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
}
# libjpeg-turbo (imagecodecs.jpeg8_decode) decodes these bit-exactly, GIL released.
# pydicom 3.0.2 has no JPEG Lossless SV1 encoder and needs extra packages for the other two.
_GDCM_SYNTAXES = {
    "jpeg_lossless": "JPEGLosslessProcess14_1",
    "jpeg_ls": "JPEGLSLossless",
    "jpeg2000": "JPEG2000Lossless",
}


# ---- DICOM --------------------------------------------------------------------------------------
def write_slice(
    path: str | Path,
    hu: np.ndarray,
    *,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    instance_number: int,
    position: Sequence[float],
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    pixel_spacing: tuple[float, float] = (0.5, 0.5),
    slice_thickness: float = 1.0,
    rescale_intercept: float = -1024.0,
    rescale_slope: float = 1.0,
    pixel_representation: int = 0,
    window: tuple[float, float] = BONE_WINDOW,
    transfer_syntax: str = "explicit",
    patient_id: str | None = None,
) -> None:
    """Write one CT slice as a deterministic Part-10 file, atomically.

    ``hu``: (H, W) float HU. Stored values = rint((hu - intercept) / slope) clipped to uint16
    (``pixel_representation`` 0) or int16 (1); BitsAllocated = BitsStored = 16 always.
    ``transfer_syntax``: one of ``TRANSFER_SYNTAXES`` (all lossless). UIDs come from the arguments
    (FrameOfReferenceUID is derived from ``study_uid``) and no clock value is written, so equal
    inputs give byte-identical files.
    """
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"{path}: transfer_syntax must be one of {list(TRANSFER_SYNTAXES)}")
    ds = _ct_dataset(
        _stored_values(hu, rescale_intercept, rescale_slope, pixel_representation, path),
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        instance_number=instance_number,
        position=position,
        orientation=orientation,
        pixel_spacing=pixel_spacing,
        slice_thickness=slice_thickness,
        rescale=(rescale_intercept, rescale_slope),
        window=window,
        patient_id=patient_id or study_uid,
    )
    with atomic_path(path) as tmp:
        if transfer_syntax == "rle":
            ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
        elif transfer_syntax in _GDCM_SYNTAXES:
            _gdcm_compress(ds, _GDCM_SYNTAXES[transfer_syntax])
        ds.save_as(tmp, enforce_file_format=True)


def _stored_values(
    hu: np.ndarray, intercept: float, slope: float, pixel_representation: int, path: str | Path
) -> np.ndarray:
    """(H, W) HU -> (H, W) uint16 (representation 0) or int16 (1) stored values."""
    hu = np.asarray(hu, dtype=np.float64)
    if hu.ndim != 2 or not np.isfinite(hu).all():
        raise ValueError(f"{path}: hu must be a finite 2-D array, got shape {hu.shape}")
    if pixel_representation not in (0, 1) or slope == 0:
        raise ValueError(f"{path}: bad pixel_representation {pixel_representation} / slope {slope}")
    dtype = np.dtype(np.int16 if pixel_representation else np.uint16)
    limits = np.iinfo(dtype)
    return np.clip(np.rint((hu - intercept) / slope), limits.min, limits.max).astype(dtype)


def _ds(values: Sequence[float]) -> list[DSfloat]:
    """Decimal strings that fit the 16-character DS limit."""
    return [DSfloat(float(v), auto_format=True) for v in values]


def _ct_dataset(
    stored: np.ndarray,
    *,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    instance_number: int,
    position: Sequence[float],
    orientation: Sequence[float],
    pixel_spacing: tuple[float, float],
    slice_thickness: float,
    rescale: tuple[float, float],
    window: tuple[float, float],
    patient_id: str,
) -> Dataset:
    """Explicit VR Little Endian CT dataset holding ``stored`` (H, W) uncompressed."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "CT"
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "FrameOfReferenceUID"])
    ds.BodyPartExamined = "CSPINE"
    ds.ConvolutionKernel = "BONE"
    ds.InstanceNumber = int(instance_number)
    ds.ImagePositionPatient = _ds(position)
    ds.ImageOrientationPatient = _ds(orientation)
    ds.PixelSpacing = _ds(pixel_spacing)
    ds.SliceThickness = DSfloat(float(slice_thickness), auto_format=True)
    ds.RescaleIntercept, ds.RescaleSlope = _ds(rescale)
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = _ds(window)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = int(stored.dtype == np.int16)
    ds.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
    return ds


def _gdcm_compress(ds: Dataset, gdcm_syntax: str) -> None:
    """Replace ``ds``'s pixel data by its gdcm encoding in ``gdcm_syntax``, in place.

    gdcm only encodes files, and rewrites some tags when it does, so it encodes a scratch copy and
    only its encapsulated pixel data is taken back.
    """
    import gdcm  # imported here: only the writer needs it

    with tempfile.TemporaryDirectory() as scratch:
        scratch_file = str(Path(scratch) / "slice.dcm")
        ds.save_as(scratch_file, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(scratch_file)
        if not reader.Read():
            raise RuntimeError(f"gdcm could not read back {scratch_file}")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, gdcm_syntax)))
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise RuntimeError(f"gdcm could not encode {gdcm_syntax}")
        writer = gdcm.ImageWriter()
        writer.SetFileName(scratch_file)
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise RuntimeError(f"gdcm could not write {scratch_file}")
        encoded = pydicom.dcmread(scratch_file)
    ds.file_meta.TransferSyntaxUID = encoded.file_meta.TransferSyntaxUID
    ds.PixelData = encoded.PixelData
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True


# ---- NIfTI ------------------------------------------------------------------------------------
def save_rsna_seg(
    path: str | Path,
    labels: np.ndarray,
    pixel_spacing: tuple[float, float] = (1.0, 1.0),
    z_spacing: float = 1.0,
) -> None:
    """Write (Z head -> feet, H, W) uint8 labels as an RSNA-style uncompressed ``.nii``, atomically.

    Inverse of ``load_rsna_seg``: the stored array is ``labels.transpose(2, 1, 0)[:, ::-1, ::-1]``
    (x = col, y = row flipped, z = feet -> head). ``pixel_spacing``: (row, col) mm; ``z_spacing``:
    mm. Affine: diag(-col, row, z) mm in RAS+ with qform/sform code 1, i.e. LAS axes, which is
    what that array layout means for an axial DICOM stack with identity orientation.
    """
    path = Path(path)
    if path.suffix != ".nii":
        raise ValueError(f"{path}: segmentations are written as uncompressed .nii")
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"{path}: labels must be (Z, H, W), got shape {labels.shape}")
    if labels.dtype != np.uint8:
        labels = as_labels(labels, str(path))
    arr = np.ascontiguousarray(labels.transpose(2, 1, 0)[:, ::-1, ::-1])
    affine = np.diag([-float(pixel_spacing[1]), float(pixel_spacing[0]), float(z_spacing), 1.0])
    image = nib.Nifti1Image(arr, affine)
    image.header.set_data_dtype(np.uint8)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        tmp.write_bytes(image.to_bytes())
