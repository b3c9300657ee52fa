"""DICOM medical images as first-class citizens of fastai

Modules:

- `fastdcm.augment`: Batch transforms for DICOM on any device: windows -> channels, random windows, full-depth histogram equalisation and CLAHE, intensity augmentations that respect modality values, and `dicom_aug_transforms`.
- `fastdcm.export`: Get the pixels out of DICOM for deep learning without losing bits or leaking patients: lossless 16-bit PNG/TIFF/npy with the exact value mapping kept, pseudonymous names and keys, and DICOM-to-DICOM de-identification (PS3.15).
- `fastdcm.synth`: Write realistic, valid DICOM files (CR, DX, CT, MR, US; classic and enhanced multi-frame; CT series) from scikit-image phantoms, deterministic from a seed, for tests, docs and the demo.
- `fastdcm.volume`: CT/MR series as validated 3-D volumes: find the series in a folder, sort slices by position, refuse broken series with a clear message, resample on the GPU, and feed 2-D learners with 2.5-D slice stacks."""

__version__ = "0.0.1"
