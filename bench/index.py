"""Header index speed: `index_dicoms` against a pydicom loop, in one process and with today's local pool, as ratios.

Writes N (default 2,000) small CTs (pydicom's `CT_small.dcm`, a new SOP Instance UID each; ~260 elements a header) in
20 folders, reads them once to warm the OS cache, then times over all files (best of `--repeat`, interleaved):

- pydicom loop (the anchor): `dcmread(f, stop_before_pixels=True)` and `{el.keyword: el.value}` of its top-level
  elements (sequences left out) per file, then `pd.DataFrame(rows)`: what a user writes without fastdcm;
- pydicom's header parse alone (`stop_before_pixels`, no value converted): the floor of any pydicom-based index;
- `index_dicoms(arc, n_workers=0)`: one process, as shipped (each raw element converted by pydicom's
  `convert_raw_data_element` directly, a conversion already made for the same bytes reused: see
  `fastdcm.core._converted`);
- the same through `Dataset.__getitem__` for every element (the conversion route before issue 13);
- `index_dicoms(arc, n_workers=2)`: the local process pool (bounded by the free cores: the load average is printed);
- then the first three again on a CT series as a scanner writes it (bench/decode.py's header: per-slice UIDs,
  positions, numbers), and on pydicom's own test files (mixed headers: few conversions reused).

Reused conversions are cleared before every timed pass.

Why the compiled backend doesn't read the index's headers: a Python walk over dicomsdl's elements building pydicom's
raw elements measured slower than pydicom's own parse (1,140 against 725 us for these 256-element headers), and the
parse was a quarter of the index's time; the rest was pydicom converting values, kept so every column is pydicom's.
Dask's throughput is bench/scale.py's. Not run in CI.

    python bench/index.py [--n 2000] [--repeat 3]
"""
import argparse, contextlib, os, shutil, tempfile, time, warnings
from pathlib import Path
import pandas as pd, pydicom
from pydicom.data import get_testdata_file
import fastdcm.core as core
from fastdcm.core import index_dicoms, get_dicom_files

def make_archive(root:Path, n:int):
    ds = pydicom.dcmread(get_testdata_file('CT_small.dcm'))
    for i in range(n):
        d = root/f'site{i % 20:02d}'; d.mkdir(parents=True, exist_ok=True)
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(i)])
        ds.save_as(d/f'im{i:05d}.dcm')
    return root

def pydicom_loop(files):
    rows = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        rows.append({'fname': str(f), **{el.keyword: el.value for el in ds if el.keyword and el.VR != 'SQ'}})
    return pd.DataFrame(rows)

def parse_only(files):
    for f in files: pydicom.dcmread(f, stop_before_pixels=True)

@contextlib.contextmanager
def getitem_route():
    "`fastdcm.core.header_dict` converting every element through `Dataset.__getitem__`, as before issue 13."
    orig = core._converted
    core._converted = lambda ds, tag, charset, settings=None: ds[tag]
    try: yield
    finally: core._converted = orig

def time_runs(runs, repeat):
    "Best seconds of each of `runs` ({name: (f, through the __getitem__ route)}) over `repeat` interleaved rounds, each pass without reused conversions; and the load average after each round."
    best, loads = {k: float('inf') for k in runs}, []
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for _ in range(repeat):
            for k, (f, old) in runs.items():
                core._CONVERTED.clear()   # no conversion reused from an earlier pass: each pass starts cold
                with (getitem_route() if old else contextlib.nullcontext()):
                    t = time.perf_counter(); f(); best[k] = min(best[k], time.perf_counter() - t)
            loads.append(os.getloadavg()[0])
    return best, loads

def report(best, n, anchor):
    for k, t in best.items(): print(f'  {k:52s} {n/t:7.0f} files/s   x{best[anchor]/t:5.2f} vs the pydicom loop')

def series(n, repeat):
    "The same on a CT series as a scanner writes it (bench/decode.py's header: a UID, position, instance number and slice location per slice, the rest repeated), 32 x 32 pixels: the realistic share of reused conversions."
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from decode import make_files
    tmp = Path(tempfile.mkdtemp())
    try:
        files = make_files(tmp, n, 32)
        runs = {'pydicom loop': (lambda: pydicom_loop(files), False), 'index_dicoms, 1 process': (lambda: index_dicoms(files, n_workers=0, progress=False), False),
                'index_dicoms, __getitem__ route': (lambda: index_dicoms(files, n_workers=0, progress=False), True)}
        best, loads = time_runs(runs, repeat)
        print(f'a CT series of {n} slices (bench/decode.py\'s header), best of {repeat}; load average {loads[-1]:.2f}')
        report(best, n, 'pydicom loop')
    finally: shutil.rmtree(tmp, ignore_errors=True)

def mixed(repeat):
    "The same on pydicom's own test files (~150 different headers: CT, MR, RT, SR, US, enhanced...): little repeats from file to file, so few conversions are reused."
    from pydicom.data.data_manager import external_data_sources, DataTypes
    files = sorted(Path(get_testdata_file('CT_small.dcm')).parent.glob('*.dcm'))
    files += [Path(p) for src in external_data_sources().values() for p in src.get_paths('*.dcm', DataTypes.DATASET)]
    def anchor_reads(f):   # only files the anchor reads are timed (index_dicoms reads every file anyway)
        try: pydicom_loop([f])
        except Exception: return False
        return True
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ok = [f for f in files if anchor_reads(f)]
    runs = {'pydicom loop': (lambda: pydicom_loop(ok), False), 'index_dicoms, 1 process': (lambda: index_dicoms(ok, n_workers=0, progress=False), False),
            'index_dicoms, __getitem__ route': (lambda: index_dicoms(ok, n_workers=0, progress=False), True)}
    best, loads = time_runs(runs, repeat)
    print(f'pydicom\'s test files ({len(ok)} the loop reads, mixed headers), best of {repeat}; load average {loads[-1]:.2f}')
    report(best, len(ok), 'pydicom loop')

def main(n=2000, repeat=3):
    tmp = Path(tempfile.mkdtemp())
    try:
        arc = make_archive(tmp/'arc', n)
        files = get_dicom_files(arc)
        for f in files: f.read_bytes()   # warm the OS cache
        with getitem_route(): before = index_dicoms(files, n_workers=0, progress=False)
        pd.testing.assert_frame_equal(index_dicoms(files, n_workers=0, progress=False), before)   # same frame either route
        runs = {'pydicom loop (dcmread + {keyword: value})': (lambda: pydicom_loop(files), False),
                'pydicom header parse alone (no values)': (lambda: parse_only(files), False),
                'index_dicoms, 1 process': (lambda: index_dicoms(files, n_workers=0, progress=False), False),
                'index_dicoms, 1 process, Dataset.__getitem__ route': (lambda: index_dicoms(files, n_workers=0, progress=False), True),
                'index_dicoms, local pool of 2': (lambda: index_dicoms(files, n_workers=2, progress=False), False)}
        best, loads = time_runs(runs, repeat)
        print(f'{n} CT headers (~260 elements each), os.cpu_count()={os.cpu_count()}, best of {repeat}; '
              f'load average after each round: {", ".join(f"{x:.2f}" for x in loads)}')
        report(best, n, 'pydicom loop (dcmread + {keyword: value})')
        print(f"index_dicoms 1 process: x{best['index_dicoms, 1 process, Dataset.__getitem__ route']/best['index_dicoms, 1 process']:.2f} "
              f"vs the __getitem__ route (before issue 13)")
        series(n, repeat)
        mixed(repeat)
    finally: shutil.rmtree(tmp, ignore_errors=True)

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--n', type=int, default=2000); ap.add_argument('--repeat', type=int, default=3)
    a = ap.parse_args()
    main(a.n, a.repeat)
