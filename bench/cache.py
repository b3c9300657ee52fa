"""Decode cache: epoch-2 / epoch-1 throughput on JPEG 2000 files (compass goal: >= 5x).

Writes N (default 48) synthetic CTs (`fastdcm.synth.synth_dicom`, size 512) compressed with pydicom's
`ds.compress(JPEG2000Lossless)` (pylibjpeg-openjpeg), then, in this one run:

- anchor: one pass of plain `dicom_pixels` (no cache);
- epoch 1: a `DecodeCache` in an empty folder (decode + store);
- epoch 2: the same cache again (memory-mapped reads).

Every pass touches all pixels (sum), so lazy memory maps are not flattered. The same three passes are also timed at
the item level a DataLoader sees, `open_dicom(f, cache=...)` + resize to 224 px, when `fastdcm.transforms` is there.
Prints files/s and the ratios. Not run in CI.

    python bench/cache.py [--n 48] [--size 512]
"""
import argparse, shutil, tempfile, time, warnings
from pathlib import Path
import numpy as np, pydicom
from pydicom.uid import JPEG2000Lossless
from fastdcm.pixels import dicom_pixels
from fastdcm.cache import DecodeCache
from fastdcm.synth import synth_dicom

def make_j2k(folder, n, size):
    files = []
    for i in range(n):
        fn = synth_dicom(folder/f'ct{i:03d}.dcm', modality='CT', size=size, seed=i, finding=bool(i % 2),
                         patient_id=f'P{i // 4:04d}')
        ds = pydicom.dcmread(fn)
        ds.compress(JPEG2000Lossless)
        ds.save_as(fn)
        files.append(fn)
    return files

def epoch(files, read):
    t0 = time.perf_counter()
    for f in files: float(np.asarray(read(f)).sum())
    return len(files) / (time.perf_counter() - t0)

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--n', type=int, default=48); p.add_argument('--size', type=int, default=512)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    try:
        warnings.simplefilter('ignore')
        files = make_j2k(tmp/'dicom', a.n, a.size)
        ts = pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
        print(f'{a.n} files, {a.size}x{a.size}, {ts.name}, {sum(f.stat().st_size for f in files)/2**20:.1f} MiB')
        for f in files[:2]: assert np.array_equal(DecodeCache(tmp/'check')(f), dicom_pixels(f))
        rows = []
        anchor = epoch(files, dicom_pixels)
        cache = DecodeCache(tmp/'cache')
        e1 = epoch(files, cache); e2 = epoch(files, cache)
        assert (cache.misses, cache.hits) == (a.n, a.n), cache
        rows.append(('decode (dicom_pixels / cache(f))', anchor, e1, e2))
        try:
            import torch
            from fastdcm.transforms import open_dicom
            resize = lambda t: torch.nn.functional.interpolate(t[None], size=(224, 224), mode='bilinear')[0]
            item = lambda c: (lambda f: resize(open_dicom(f, cache=c)))
            anchor_i = epoch(files, item(None))
            c2 = DecodeCache(tmp/'cache_items')
            rows.append(('item (open_dicom + resize 224)', anchor_i, epoch(files, item(c2)), epoch(files, item(c2))))
        except ImportError as e: print(f'(item level skipped: {e})')
        print(f"{'level':36s} {'no cache':>10s} {'epoch 1':>10s} {'epoch 2':>10s} {'e2/e1':>7s} {'e2/no cache':>12s}  (files/s)")
        for name, a0, a1, a2 in rows:
            print(f'{name:36s} {a0:10.1f} {a1:10.1f} {a2:10.1f} {a2/a1:6.1f}x {a2/a0:11.1f}x')
        print(f'cache on disk: {cache.nbytes()/2**20:.1f} MiB for {len(cache)} entries')
        print(f'epoch-2 / epoch-1 throughput ratio (decode level): {rows[0][3]/rows[0][2]:.1f}x (goal >= 5x)')
    finally: shutil.rmtree(tmp)

if __name__ == '__main__': main()
