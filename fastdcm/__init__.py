"""DICOM medical images as first-class citizens of fastai

Modules:

- `fastdcm.all`: One import for everything: `from fastdcm.all import *`
- `fastdcm.augment`: Batch transforms for DICOM on any device: windows -> channels, random windows, full-depth histogram equalisation and CLAHE, intensity augmentations that respect modality values, and `dicom_aug_transforms`.
- `fastdcm.backend`: An optional compiled reader for the hot path: dicomsdl parses the header in C++, numpy reads the stored pixel values, pydicom stays the reference and the fallback.
- `fastdcm.cache`: Decode each DICOM once: a drop-in for `dicom_pixels` that keeps the decoded pixels as memory-mapped `.npy` files.
- `fastdcm.cli`: The `fastdcm` command: index a folder, look inside a file, render it, convert to lossless 16-bit, anonymise, demo.
- `fastdcm.core`: Reading and finding DICOM files: typed errors, a `dcmread` whose `force` works, file discovery, and a header DataFrame.
- `fastdcm.data`: Patient-level splitters, a leakage check, and `DicomDataLoaders` that feel like `ImageDataLoaders`.
- `fastdcm.distributed`: Training on several processes with fastai's `distrib_ctx`, on GPUs (NCCL) or on CPUs (gloo), with a validation loss that is the real one.
- `fastdcm.docs`: Build this documentation site: nbdev's own notebook processing (directives, hidden cells, `show_doc` for every export) rendered to static HTML by mkdocs-material, and the export processor that names each module's public API.
- `fastdcm.export`: Get the pixels out of DICOM for deep learning without losing bits or leaking patients: lossless 16-bit PNG/TIFF/npy with the exact value mapping kept, pseudonymous names and keys, and DICOM-to-DICOM de-identification (PS3.15).
- `fastdcm.learner`: `vision_learner` / `unet_learner` that take the channels and the normalisation from the DICOM batch, and `run_demo`.
- `fastdcm.pixels`: The DICOM pixel pipeline of PS3.3 (padding, Modality LUT, VOI LUT, Presentation), in numpy, with a fast path for uncompressed files.
- `fastdcm.synth`: Write realistic, valid DICOM files (CR, DX, CT, MR, US; classic and enhanced multi-frame; CT series) from scikit-image phantoms, deterministic from a seed, for tests, docs and the demo.
- `fastdcm.transforms`: fastai types for DICOM: `TensorDicom`, `open_dicom`, `DicomBlock` and the `DicomResize` item transform.
- `fastdcm.volume`: CT/MR series as validated 3-D volumes: find the series in a folder, sort slices by position, refuse broken series with a clear message, resample on the GPU, list 2.5-D slice stacks. numpy/torch/pydicom only: no fastai.
- `fastdcm.volume_data`: Volumes as fastai items: 2.5-D slice stacks and 3-D volumes, their blocks, item and batch transforms, 3-D masks.
- `fastdcm.volume_learner`: 3-D classification, regression and segmentation learners on DICOM series, with MONAI's networks; `predict` on a series folder, sliding windows, flip TTA."""

__version__ = "0.0.1"
