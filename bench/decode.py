"""Decode speed: fastdcm modality decode vs pydicom `pixel_array` + `apply_modality_lut` vs fastai `PILDicom.create`.

Writes N (default 200) 512x512 int16 CT files with pydicom into a temporary folder, reads each once to warm the OS
cache, then times the three readers over all files (best of R rounds, interleaved) and prints files/s and ratios
against pydicom measured in this same run. Not run in CI.

    python bench/decode.py [--n 200] [--size 512] [--rounds 3]
"""
import argparse, shutil, tempfile, time, warnings
from pathlib import Path
import numpy as np, pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, CTImageStorage, generate_uid
from pydicom.pixels import apply_modality_lut
from fastdcm.pixels import dicom_pixels

def write_ct(fn, arr, i, study, series):
    "A CT slice with a realistic header (patient/study/series/equipment/geometry/rescale/window)."
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset(); ds.file_meta = meta
    ds.SpecificCharacterSet, ds.ImageType = 'ISO_IR 100', ['ORIGINAL', 'PRIMARY', 'AXIAL']
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = '20240101'
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = '120000'
    ds.AccessionNumber, ds.Modality, ds.Manufacturer = 'A0001', 'CT', 'fastdcm bench'
    ds.InstitutionName, ds.ReferringPhysicianName, ds.StudyDescription = 'Bench Hospital', 'Doe^John', 'CT CHEST'
    ds.SeriesDescription, ds.ManufacturerModelName = 'AXIAL 1mm', 'Synth 64'
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = 'Bench^Patient', 'B0001', '19700101', 'O'
    ds.BodyPartExamined, ds.SliceThickness, ds.KVP = 'CHEST', 1.0, 120
    ds.DataCollectionDiameter, ds.ReconstructionDiameter = 500, 360
    ds.GantryDetectorTilt, ds.TableHeight, ds.ExposureTime, ds.XRayTubeCurrent = 0, 150, 500, 300
    ds.ConvolutionKernel, ds.PatientPosition = 'B30f', 'HFS'
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, generate_uid(entropy_srcs=[study])  # one frame of reference per study
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = '1', 1, i + 1
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [-180, -180, -i*1.0], [1, 0, 0, 0, 1, 0]
    ds.SliceLocation, ds.PositionReferenceIndicator = -i*1.0, ''
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, 'MONOCHROME2'
    ds.Rows, ds.Columns, ds.PixelSpacing = arr.shape[0], arr.shape[1], [0.703125, 0.703125]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.WindowCenter, ds.WindowWidth, ds.WindowCenterWidthExplanation = [40, -600], [400, 1500], ['MEDIASTINUM', 'LUNG']
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, 'HU'
    ds.PixelData = arr.astype('<i2').tobytes()
    ds.save_as(fn, enforce_file_format=True)

def make_files(folder, n, size, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size/2)**2 + (xx - size/2)**2) < (0.42*size)**2
    study, series = generate_uid(), generate_uid()
    files = []
    for i in range(n):
        arr = np.where(body, 1024 + 40 + rng.normal(0, 20, (size, size)), 0).astype(np.int16)   # stored: HU + 1024
        fn = folder/f'CT{i:04d}.dcm'; write_ct(fn, arr, i, study, series); files.append(fn)
    return files

def read_fastdcm(fn): return dicom_pixels(fn, 'modality')
def read_pydicom(fn):
    ds = pydicom.dcmread(fn)
    return apply_modality_lut(ds.pixel_array, ds)

def fastai_reader():
    "fastai's `PILDicom.create`, or None with the reason when it can't run here."
    try:
        from fastai.medical.imaging import PILDicom
        return PILDicom.create, None
    except Exception as e: return None, f'{type(e).__name__}: {e}'

def time_reader(f, files):
    t0 = time.perf_counter()
    for fn in files: f(fn)
    return time.perf_counter() - t0

def main(n=200, size=512, rounds=3):
    folder = Path(tempfile.mkdtemp(prefix='fastdcm_bench_'))
    try:
        files = make_files(folder, n, size)
        for fn in files: fn.read_bytes()   # warm the OS cache
        # same numbers from both (on all pixels: these files have no padding)
        np.testing.assert_allclose(read_fastdcm(files[0]), read_pydicom(files[0]), atol=1e-3)
        readers = {'fastdcm dicom_pixels (modality)': read_fastdcm, 'pydicom pixel_array + apply_modality_lut': read_pydicom}
        pil, why = fastai_reader()
        if pil is not None:
            try: pil(files[0]); readers['fastai PILDicom.create'] = pil
            except Exception as e: why = f'{type(e).__name__}: {e}'
        best = {k: float('inf') for k in readers}
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            for _ in range(rounds):
                for k, f in readers.items(): best[k] = min(best[k], time_reader(f, files))
        base = n / best['pydicom pixel_array + apply_modality_lut']
        print(f'{n} files, {size}x{size} int16 CT, best of {rounds} rounds')
        for k, t in best.items(): print(f'{k:45s} {n/t:8.1f} files/s   x{(n/t)/base:5.2f} vs pydicom')
        if pil is None or why: print(f'fastai PILDicom.create: not timed ({why})')
        return {k: n/t for k, t in best.items()}
    finally: shutil.rmtree(folder, ignore_errors=True)

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--n', type=int, default=200); p.add_argument('--size', type=int, default=512)
    p.add_argument('--rounds', type=int, default=3)
    a = p.parse_args()
    main(a.n, a.size, a.rounds)
