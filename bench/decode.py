"""Decode speed: fastdcm `dicom_pixels(f, 'modality')` with and without the `fast` extra, against pydicom
(`dcmread` + `pixel_array` + `apply_modality_lut`, the anchor), fastai's `PILDicom.create` and dicomsdl's own float32
path (`open_file(f).pixelData()`: header, pixels and rescale in C++, no checks), as ratios measured in one run.

Writes N (default 200) 512x512 int16 CT files with a realistic header with pydicom into a temporary folder, and copies
of the first `--n-compressed` (default 40) in JPEG 2000 lossless (pylibjpeg-openjpeg's encoder) and JPEG-LS lossless
(pyjpegls' encoder, when installed); reads each file once to warm the OS cache, checks that every fastdcm reader gives
the same values as the others (and as pydicom), then times each reader over all files of a set (best of R rounds,
readers interleaved) and prints files/s and ratios against pydicom measured in this same run.

- 'fastdcm, fast extra': as shipped with `pip install fastdcm[fast]` (dicomsdl reads uncompressed headers, CharLS
  decodes JPEG-LS, OpenJPEG through imagecodecs decodes JPEG 2000 on `decode_threads()` threads: as many as the CPUs,
  at most 8); '..., 1 decode thread': the same with `FASTDCM_DECODE_THREADS=1` (JPEG 2000 only: what threads add);
  'fastdcm, pydicom only': the same code with the extra switched off (the plain install).

Goals (issue 13): with the extra >= 4x pydicom on uncompressed 512x512 CT and >= 2x on JPEG 2000 / JPEG-LS; without
it, no slower than before. CPU only (no --device: nothing here runs on a GPU). Not run in CI.

    python bench/decode.py [--n 200] [--n-compressed 40] [--size 512] [--rounds 3]
"""
import argparse, contextlib, os, shutil, tempfile, time, warnings
from pathlib import Path
import numpy as np, pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, CTImageStorage, generate_uid, JPEG2000Lossless, JPEGLSLossless
from pydicom.pixels import apply_modality_lut
import fastdcm.pixels as pixels
from fastdcm import backend
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

def compressed_copies(files, folder, uid):
    "Copies of `files` compressed to transfer syntax `uid` by pydicom's encoders, or (None, why) when no encoder is installed."
    out = []
    for fn in files:
        ds = pydicom.dcmread(fn)
        try: ds.compress(uid, generate_instance_uid=False)
        except (RuntimeError, NotImplementedError) as e: return None, f'{type(e).__name__}: {str(e).splitlines()[0]}'
        dst = folder/f'{uid.name.split()[0]}_{fn.name}'; ds.save_as(dst); out.append(dst)
    return out, None

@contextlib.contextmanager
def fast_extra(on, threads=None):
    "`fastdcm.pixels` as shipped (`on`: the `fast` extra used where installed; `threads`: JPEG 2000 decode threads, default `decode_threads()`) or with the extra switched off (the plain install's path)."
    load, fast, env = backend.load, pixels._decode_fast, os.environ.get('FASTDCM_DECODE_THREADS')
    try:
        if not on: backend.load, pixels._decode_fast = (lambda *a, **k: None), (lambda *a, **k: None)
        if threads: os.environ['FASTDCM_DECODE_THREADS'] = str(threads)
        yield
    finally:
        backend.load, pixels._decode_fast = load, fast
        if env is None: os.environ.pop('FASTDCM_DECODE_THREADS', None)
        else: os.environ['FASTDCM_DECODE_THREADS'] = env

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

def dicomsdl_reader():
    "dicomsdl's own float32 path (rescale applied in C++), or None with the reason."
    try: import dicomsdl
    except ImportError as e: return None, f'{type(e).__name__}: {e}'
    return (lambda fn: dicomsdl.open_file(str(fn)).pixelData()), None

FAST, FAST1, PLAIN, PYD = ('fastdcm dicom_pixels, fast extra', 'fastdcm dicom_pixels, fast extra, 1 decode thread',
                          'fastdcm dicom_pixels, pydicom only', 'pydicom pixel_array + apply_modality_lut')

def bench_set(name, files, rounds):
    "Check, time and print every reader on `files`; returns {reader: files/s}."
    with fast_extra(True): fast = read_fastdcm(files[0])
    with fast_extra(False): plain = read_fastdcm(files[0])
    assert fast.dtype == plain.dtype == np.float32 and np.array_equal(fast, plain), f'{name}: fastdcm with and without the extra differ'
    np.testing.assert_allclose(fast, read_pydicom(files[0]), atol=1e-3)   # these files have no padding
    readers = {FAST: (read_fastdcm, True), FAST1: (read_fastdcm, 1), PLAIN: (read_fastdcm, False), PYD: (read_pydicom, None)}
    if 'JPEG 2000' not in name: del readers[FAST1]   # threads only matter to JPEG 2000's decode
    notes = []
    for label, (f, why) in {'fastai PILDicom.create': fastai_reader(), "dicomsdl's own pixelData() float32 (unchecked)": dicomsdl_reader()}.items():
        if f is not None:
            try: f(files[0]); readers[label] = (f, None)
            except Exception as e: why = f'{type(e).__name__}: {e}'
        if why: notes.append(f'{label}: not timed ({why})')
    best = {k: float('inf') for k in readers}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for _ in range(rounds):
            for k, (f, on) in readers.items():
                with (fast_extra(bool(on), threads=None if on is True else on) if on is not None else contextlib.nullcontext()):
                    t0 = time.perf_counter()
                    for fn in files: f(fn)
                    best[k] = min(best[k], time.perf_counter() - t0)
    rate = {k: len(files)/t for k, t in best.items()}
    print(f'\n{name}: {len(files)} files, best of {rounds} rounds')
    for k, r in rate.items(): print(f'  {k:48s} {r:9,.1f} files/s   x{r/rate[PYD]:5.2f} vs pydicom')
    for n in notes: print('  ' + n)
    return rate

def main(n=200, n_compressed=40, size=512, rounds=3):
    folder = Path(tempfile.mkdtemp(prefix='fastdcm_bench_'))
    try:
        files = make_files(folder, n, size)
        sets = {f'uncompressed {size}x{size} int16 CT': files}
        skipped = []
        for uid in (JPEG2000Lossless, JPEGLSLossless):
            out, why = compressed_copies(files[:n_compressed], folder, uid)
            if out: sets[f'{uid.name} {size}x{size} int16 CT'] = out
            else: skipped.append(f'{uid.name}: no encoder to write the files ({why})')
        for fs in sets.values():
            for fn in fs: fn.read_bytes()   # warm the OS cache
        print(f'os.cpu_count()={os.cpu_count()}, load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; '
              f'dicomsdl installed: {backend.available()}; pyjpegls installed: {_has("jpeg_ls")}; '
              f'imagecodecs installed: {_has("imagecodecs")}, JPEG 2000 decode threads: {backend.decode_threads()}')
        res = {k: bench_set(k, fs, rounds) for k, fs in sets.items()}
        for s in skipped: print(s)
        print('\ngoals: fast extra / pydicom (>= 4 uncompressed, >= 2 JPEG 2000 / JPEG-LS); pydicom only / pydicom (no slower than before)')
        for k, r in res.items():
            one = f'   (1 decode thread x{r[FAST1]/r[PYD]:5.2f})' if FAST1 in r else ''
            print(f'  {k:40s} fast extra x{r[FAST]/r[PYD]:5.2f}   pydicom only x{r[PLAIN]/r[PYD]:5.2f}{one}')
        print(f'load average after: {os.getloadavg()[0]:.2f}')
        return res
    finally: shutil.rmtree(folder, ignore_errors=True)

def _has(mod):
    try: __import__(mod); return True
    except ImportError: return False

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--n', type=int, default=200); p.add_argument('--n-compressed', type=int, default=40)
    p.add_argument('--size', type=int, default=512); p.add_argument('--rounds', type=int, default=3)
    a = p.parse_args()
    main(a.n, a.n_compressed, a.size, a.rounds)
