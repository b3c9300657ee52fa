"""Compiled backend vs pydicom: stored values read and converted to float32, as ratios measured in one run.

Writes N (default 200) uncompressed 512 x 512 int16 CT files with a realistic header (bench/decode.py's writer),
reads each once to warm the OS cache, then times, over all files (best of R rounds, interleaved):

- pydicom:            `dcmread` + `pixel_array` -> float32 (the anchor);
- fastdcm, no backend: `fastdcm.pixels._load` with the backend declining (pydicom's header parse + fastdcm's numpy read);
- backend:            `fastdcm.backend.load` -> float32 (dicomsdl's header parse + numpy read);
- dicomsdl's own:     `open_file` + `pixelData()` (float32 with rescale applied by dicomsdl; no checks): the ceiling;
- header only:        pydicom's `stop_before_pixels` read vs the backend's header;
- modality stage:     `dicom_pixels(f, 'modality')` without and with the backend wired into `fastdcm.pixels._load`.

`--candidates` adds the other compiled readers when importable (python-gdcm, fastdicom, SimpleITK: stored values as
each returns them). Prints files/s and the ratio to pydicom. Not run in CI.

    python bench/backend.py [--n 200] [--size 512] [--rounds 3] [--candidates]
"""
import argparse, contextlib, os, shutil, sys, tempfile, time, warnings
from pathlib import Path
import numpy as np, pydicom
sys.path.insert(0, str(Path(__file__).parent))
from decode import make_files
import fastdcm.pixels as pixels
from fastdcm import backend

@contextlib.contextmanager
def backend_switched(on:bool):
    "`fastdcm.pixels` (wired to the backend in `_load`) with the compiled backend reading files (`on`) or declining all."
    orig = backend.load
    try:
        if not on: backend.load = lambda *a, **k: None
        yield
    finally: backend.load = orig

def f32_pydicom(fn): return pydicom.dcmread(fn).pixel_array.astype(np.float32)
def f32_fastdcm(fn): return pixels._load(fn)[1].astype(np.float32)
def f32_backend(fn): return backend.load(fn)[1].astype(np.float32)
def hdr_pydicom(fn): return pydicom.dcmread(fn, stop_before_pixels=True)
def hdr_backend(fn):
    with open(fn, 'rb') as f:
        buf, sds, implicit, ts, pos = backend._locate(f, os.fstat(f.fileno()).st_size)
        return backend._header(buf, sds, implicit, ts)
def modality(fn): return pixels.dicom_pixels(fn, 'modality')

def candidates():
    "The other compiled readers that are importable here: name -> reader of stored values."
    out = {}
    try:
        import gdcm
        def read_gdcm(fn):
            r = gdcm.ImageReader(); r.SetFileName(str(fn))
            if not r.Read(): raise RuntimeError(f'gdcm could not read {fn}')
            img = r.GetImage()
            buf = img.GetBuffer().encode('utf-8', 'surrogateescape')   # how pydicom's gdcm handler gets the bytes
            return np.frombuffer(buf, '<i2').reshape(img.GetDimension(1), img.GetDimension(0))
        out['python-gdcm'] = read_gdcm
    except ImportError: pass
    try:
        import fastdicom
        out['fastdicom'] = lambda fn: fastdicom.dcmread(str(fn)).pixel_array
    except ImportError: pass
    try:
        import SimpleITK as sitk
        out['SimpleITK'] = lambda fn: sitk.GetArrayFromImage(sitk.ReadImage(str(fn)))
    except ImportError: pass
    return out

HDR, MOD = "header: backend's", "dicom_pixels('modality')"

def main(n=200, size=512, rounds=3, with_candidates=False):
    if not backend.available(): sys.exit('dicomsdl is not installed: pip install fastdcm[fast] (or dicomsdl)')
    import dicomsdl
    folder = Path(tempfile.mkdtemp(prefix='fastdcm_bench_'))
    try:
        files = make_files(folder, n, size)
        for fn in files: fn.read_bytes()   # warm the OS cache
        for fn in files[:5]:   # same values from every path before timing anything
            ref = pydicom.dcmread(fn).pixel_array
            assert np.array_equal(backend.load(fn)[1], ref) and np.array_equal(pixels._load(fn)[1], ref)
            with backend_switched(True): on = modality(fn)
            with backend_switched(False): off = modality(fn)
            assert np.array_equal(on, off)
        readers = {'pydicom dcmread + pixel_array -> float32': (f32_pydicom, None),
                   'fastdcm without backend -> float32': (f32_fastdcm, False),
                   'backend.load -> float32': (f32_backend, None),
                   "dicomsdl's own pixelData() float32 (ceiling)": (lambda fn: dicomsdl.open_file(str(fn)).pixelData(), None),
                   'header: pydicom stop_before_pixels': (hdr_pydicom, None),
                   HDR: (hdr_backend, None),
                   MOD + ' without backend': (modality, False),
                   MOD + ' with backend': (modality, True)}
        if with_candidates:
            readers.update({f'{k} stored values': (f, None) for k, f in candidates().items()})
        best = {k: float('inf') for k in readers}
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            for _ in range(rounds):
                for k, (f, on) in readers.items():
                    with (backend_switched(on) if on is not None else contextlib.nullcontext()):
                        t0 = time.perf_counter()
                        for fn in files: f(fn)
                        best[k] = min(best[k], time.perf_counter() - t0)
        anchor = best['pydicom dcmread + pixel_array -> float32']
        print(f'{n} uncompressed {size}x{size} int16 CT files, best of {rounds} rounds (os.cpu_count()={os.cpu_count()})')
        for k, t in best.items():
            print(f'  {k:48s} {n / t:9,.0f} files/s   {anchor / t:6.2f}x pydicom')
        ratio = lambda slow, fast: best[slow] / best[fast]
        print(f"backend.load vs fastdcm without backend: {ratio('fastdcm without backend -> float32', 'backend.load -> float32'):.2f}x; "
              f"header: {ratio('header: pydicom stop_before_pixels', HDR):.1f}x; dicom_pixels modality with vs without "
              f"backend: {ratio(MOD + ' without backend', MOD + ' with backend'):.2f}x")
    finally: shutil.rmtree(folder, ignore_errors=True)

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--n', type=int, default=200)
    p.add_argument('--size', type=int, default=512)
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--candidates', action='store_true', help='also time python-gdcm, fastdicom and SimpleITK when importable')
    a = p.parse_args()
    main(a.n, a.size, a.rounds, a.candidates)
