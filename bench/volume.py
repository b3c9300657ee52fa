"""Benchmark `fastdcm.volume.load_series` on a 256-slice 512x512 CT series against its anchors.

    python bench/volume.py [--slices 256] [--size 512] [--repeats 5]

Prints, from one run:
- time ratio: `load_series(folder)` / sum over the slices of `dicom_pixels(file)` timed one by one   (goal <= 1.2)
- peak memory ratio: peak traced allocation during `load_series` / the volume's bytes             (goal <= 1.5)
  (tracemalloc, which sees numpy's buffers; RSS growth sampled from /proc is printed as a cross-check)

Both sides read files already in the page cache (a warm-up pass reads them first); timings are the best of
`--repeats`, interleaved, so a busy shared machine hurts both sides alike; the ratio of medians is printed too.
Anchors, both part of any load and of none of the one-by-one decodes: reading the headers and making the geometry
records (the check done before decoding, with pydicom: about 15 elements converted per slice), and allocating and
touching a fresh volume-sized array (the one-by-one decodes reuse the same freed slice buffer). numpy asks for
transparent huge pages for big arrays; where THP defrag is `madvise` the kernel sometimes compacts memory to supply
them, and that allocation (in `load_series` or in the anchor alike) then takes 3-5x longer, almost all of it system
time (measured here: 0.79 s system vs 0.05 s): hence best-of timings, and the medians printed beside them. The
series is written by
`fastdcm.synth.synth_ct_series` in a temporary folder, removed at the end.
"""
import argparse, gc, os, shutil, tempfile, threading, time, tracemalloc
from pathlib import Path
import numpy as np
from fastdcm.pixels import dicom_pixels
from fastdcm.synth import synth_ct_series
from fastdcm.volume import load_series, slice_records
from fastdcm.core import dcmread

def _rss():
    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')

class RSSPeak:
    "Sample the resident set size every few ms in a thread; `.peak` - `.start` is the growth."
    def __init__(self, every=0.002): self.every = every
    def __enter__(self):
        self.start = self.peak = _rss(); self.done = False
        self.t = threading.Thread(target=self._run, daemon=True); self.t.start(); return self
    def _run(self):
        while not self.done:
            self.peak = max(self.peak, _rss()); time.sleep(self.every)
    def __exit__(self, *a):
        self.done = True; self.t.join(); self.peak = max(self.peak, _rss())

def main(n_slices=256, size=512, repeats=5):
    tmp = Path(tempfile.mkdtemp(prefix='fastdcm_bench_volume_'))
    try:
        t = time.perf_counter()
        files = synth_ct_series(tmp/'series', n_slices=n_slices, size=size, seed=0)
        print(f'wrote {len(files)} slices of {size}x{size} in {time.perf_counter()-t:.1f} s '
              f'({sum(os.path.getsize(f) for f in files)/2**20:.0f} MiB)')
        for f in files: Path(f).read_bytes()            # warm the page cache for both sides
        dicom_pixels(files[0]); load_series(tmp/'series', min_slices=2).array  # warm imports / code paths
        sums, loads, touches, heads = [], [], [], []
        for _ in range(repeats):
            gc.collect()
            t = time.perf_counter(); a = np.empty((n_slices, size, size), np.float32); a.fill(0.); touches.append(time.perf_counter() - t)
            del a
            gc.collect()
            t = time.perf_counter()
            for f in files: slice_records(f, dcmread(f, stop_before_pixels=True))
            heads.append(time.perf_counter() - t)
            gc.collect()
            total = 0.
            for f in files:
                t = time.perf_counter(); dicom_pixels(f); total += time.perf_counter() - t
            sums.append(total)
            gc.collect()
            t = time.perf_counter(); vol = load_series(tmp/'series'); loads.append(time.perf_counter() - t)
            nbytes = vol.array.nbytes
            del vol
        gc.collect()
        with RSSPeak() as rss:
            tracemalloc.start(); tracemalloc.reset_peak()
            vol = load_series(tmp/'series')
            _, peak = tracemalloc.get_traced_memory(); tracemalloc.stop()
        assert vol.shape == (n_slices, size, size)
        t_sum, t_load = min(sums), min(loads)
        print(f'sum of dicom_pixels one by one: {t_sum:.3f} s  (best of {repeats}: {", ".join(f"{s:.3f}" for s in sums)})')
        print(f'load_series:                    {t_load:.3f} s  (best of {repeats}: {", ".join(f"{s:.3f}" for s in loads)})')
        print(f'anchor: allocating and touching a volume-sized float32 array: {min(touches):.3f} s '
              f'(best of {repeats}: {", ".join(f"{s:.3f}" for s in touches)}): part of any load, none of the slice decodes')
        print(f'anchor: reading the headers with pydicom and making the geometry records (what find_series does): '
              f'{min(heads):.3f} s (best of {repeats}): part of any checked load, none of the slice decodes '
              f'(load_series then hands each header to dicom_pixels, so no header is parsed twice)')
        print(f'volume: {nbytes/2**20:.0f} MiB; peak traced during load_series: {peak/2**20:.0f} MiB; '
              f'RSS growth: {(rss.peak-rss.start)/2**20:.0f} MiB')
        print(f'floor for any load into a fresh array: (sum + allocation) / sum = {(t_sum+min(touches))/t_sum:.3f}')
        print(f'TIME RATIO   load / sum of slice decodes = {t_load/t_sum:.3f}   (goal <= 1.2; '
              f'ratio of medians {np.median(loads)/np.median(sums):.3f})')
        print(f'MEMORY RATIO peak / volume bytes         = {peak/nbytes:.3f}   (goal <= 1.5; RSS: {(rss.peak-rss.start)/nbytes:.3f})')
    finally: shutil.rmtree(tmp, ignore_errors=True)

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--slices', type=int, default=256); p.add_argument('--size', type=int, default=512)
    p.add_argument('--repeats', type=int, default=5)
    a = p.parse_args()
    main(a.slices, a.size, a.repeats)
