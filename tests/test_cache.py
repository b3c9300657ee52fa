"DecodeCache: same arrays as dicom_pixels, keyed by file identity and arguments, atomic, safe across processes."
import os, sys, shutil, pickle, subprocess, time
from pathlib import Path
from concurrent.futures import ProcessPoolExecutor
import numpy as np, pytest
from pydicom.data import get_testdata_file
from fastdcm.pixels import dicom_pixels
from fastdcm.cache import DecodeCache

FILES = ['CT_small.dcm', 'MR_small_jp2klossless.dcm', 'JPEG2000.dcm', 'SC_rgb_rle_2frame.dcm', 'MR_small_RLE.dcm']

@pytest.mark.parametrize('name', FILES)
def test_same_as_dicom_pixels(tmp_path, name):
    f = get_testdata_file(name)
    cache = DecodeCache(tmp_path/'c')
    for kw in [{}, {'stage': 'display'}, {'stage': 'stored'}]:
        want = dicom_pixels(f, **kw)
        first, second = cache(f, **kw), cache(f, **kw)
        assert isinstance(second, np.memmap)
        for got in (first, second):
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
    assert (cache.hits, cache.misses) == (3, 3)

def test_window_and_frame_are_keys(tmp_path):
    f = get_testdata_file('CT_small.dcm')
    cache = DecodeCache(tmp_path)
    a = cache(f, stage='display', window=(40, 400)); b = cache(f, stage='display', window=(40, 80))
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(cache(f, stage='display', window=(40, 80)), dicom_pixels(f, stage='display', window=(40, 80)))
    mf = get_testdata_file('SC_rgb_rle_2frame.dcm')
    np.testing.assert_array_equal(cache(mf, frame=1), dicom_pixels(mf, frame=1))
    np.testing.assert_array_equal(cache(mf, frame=1), dicom_pixels(mf, frame=1))
    assert len(cache) == 3

def test_changed_file_is_decoded_again(tmp_path):
    f = tmp_path/'ct.dcm'; shutil.copy(get_testdata_file('CT_small.dcm'), f)
    other = get_testdata_file('MR_small.dcm')
    cache = DecodeCache(tmp_path/'c')
    a = np.array(cache(f))
    st = f.stat()
    shutil.copy(other, f)                                   # new content, same path
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    np.testing.assert_array_equal(cache(f), dicom_pixels(other))
    assert cache.misses == 2
    # same size, new pixels, later mtime (an in-place edit): the mtime alone must invalidate the entry
    b = bytearray(f.read_bytes()); b[-200:] = bytes(200)
    size = f.stat().st_size; f.write_bytes(bytes(b)); assert f.stat().st_size == size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 2*10**9))
    np.testing.assert_array_equal(cache(f), dicom_pixels(f))
    assert cache.misses == 3
    # same mtime, another size (a copy that kept its timestamp): the size alone must too
    shutil.copy2(get_testdata_file('CT_small.dcm'), f); os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 2*10**9))
    np.testing.assert_array_equal(cache(f), dicom_pixels(f))
    assert cache.misses == 4

def test_writable_copy_on_write(tmp_path):
    f = get_testdata_file('CT_small.dcm')
    cache = DecodeCache(tmp_path)
    cache(f); x = cache(f); x[:] = -5
    np.testing.assert_array_equal(cache(f), dicom_pixels(f))

def test_corrupt_entry_is_rebuilt(tmp_path):
    f = get_testdata_file('CT_small.dcm')
    cache = DecodeCache(tmp_path)
    cache(f)
    entry = cache.path(cache.key(f, stage='modality', frame=None, window=None, pad_value=None))
    assert entry.exists()
    entry.write_bytes(b'garbage')
    np.testing.assert_array_equal(cache(f), dicom_pixels(f))
    assert cache.misses == 2

def test_bytes_and_dataset(tmp_path):
    f = get_testdata_file('MR_small_jp2klossless.dcm')
    cache = DecodeCache(tmp_path)
    raw = Path(f).read_bytes()
    np.testing.assert_array_equal(cache(raw), dicom_pixels(f)); cache(raw)
    assert cache.hits == 1
    from fastdcm.core import dcmread
    np.testing.assert_array_equal(cache(dcmread(f)), dicom_pixels(f))
    assert len(cache) == 1

def _decode_all(args):
    folder, files = args
    c = DecodeCache(folder)
    return [float(np.asarray(c(f)).sum()) for f in files]

def test_processes_share_a_folder(tmp_path):
    files = [get_testdata_file(n) for n in FILES[:3]] * 3
    with ProcessPoolExecutor(2) as ex: res = list(ex.map(_decode_all, [(tmp_path, files)] * 4))
    want = [float(dicom_pixels(f).sum()) for f in files]
    for r in res: np.testing.assert_allclose(r, want)
    assert not list(tmp_path.rglob('*.tmp'))                # no temporary left behind
    assert len(DecodeCache(tmp_path)) == 3

def test_pickle_and_clear(tmp_path):
    cache = DecodeCache(tmp_path/'c')
    cache(get_testdata_file('CT_small.dcm'))
    c2 = pickle.loads(pickle.dumps(cache))
    assert len(c2) == 1 and c2.nbytes() > 0
    (tmp_path/'c'/'keep.txt').write_text('not ours')
    c2.clear()
    assert len(c2) == 0 and (tmp_path/'c'/'keep.txt').exists()

def test_no_fastai_import():
    code = "import sys, fastdcm.cache; assert 'fastai' not in sys.modules, 'cache imported fastai'"
    subprocess.run([sys.executable, '-c', code], check=True)

def test_open_dicom_with_cache(tmp_path):
    "DicomBlock / open_dicom take the cache as their decoder and give the same tensors."
    transforms = pytest.importorskip('fastdcm.transforms')
    cache = DecodeCache(tmp_path)
    for name in ['CT_small.dcm', 'MR_small_jp2klossless.dcm']:
        f = get_testdata_file(name)
        want = transforms.open_dicom(f)
        for _ in range(2): assert (transforms.open_dicom(f, cache=cache) == want).all()
    assert (cache.hits, cache.misses) == (2, 2)

# ---- several processes on one folder (issue 11: two ranks or DataLoader workers filling the same cache)
import multiprocessing as mp, random, traceback

def _big_cts(folder, n=6, size=768):
    "`n` uncompressed CTs of `size`^2 pixels (entries of 2.3 MB: writing one takes long enough for another process to look at it)."
    import pydicom
    ds = pydicom.dcmread(get_testdata_file('CT_small.dcm'))
    ds.Rows = ds.Columns = size
    out = []
    for i in range(n):
        ds.PixelData = np.random.default_rng(i).integers(-1000, 2000, (size, size)).astype(np.int16).tobytes()
        fn = Path(folder)/f'ct{i}.dcm'; ds.save_as(fn, enforce_file_format=True); out.append(str(fn))
    return out

def _worker(job, folder, files, seed, barrier, results):
    "One process (spawned, like a torchrun rank): `job` is 'fill' (every file and stage, in the same order then in this process's own, each result checked against a fresh decode) or 'clear-fill' (clear the cache first, as a script run by every rank may)."
    try:
        cache = DecodeCache(folder)
        calls = [(f, s) for f in files for s in ('modality', 'display')]
        want = {c: dicom_pixels(c[0], stage=c[1]) for c in calls}      # decoded before the race starts
        order = random.Random(seed)
        barrier.wait(60)
        if job == 'clear-fill': cache.clear()
        wrong = 0
        for i in range(3):
            if i: order.shuffle(calls)            # the same order first (every process misses the same entry at once), then each its own
            for f,s in calls: wrong += not np.array_equal(np.asarray(cache(f, stage=s)), want[(f, s)])
        cache.nbytes(); len(cache)
        if job == 'clear-fill': cache.clear()
        results.put((seed, wrong, None))
    except BaseException: results.put((seed, None, traceback.format_exc()))

def _race(folder, files, jobs):
    "Start one spawned process per job, released together by a barrier; {seed: wrong results} (a process that raised fails the test with its traceback)."
    ctx = mp.get_context('spawn')
    barrier, results = ctx.Barrier(len(jobs)), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(job, folder, files, seed, barrier, results)) for seed,job in enumerate(jobs)]
    for p in procs: p.start()
    got = [results.get(timeout=180) for _ in procs]
    for p in procs: p.join(60)
    errors = [tb for _,_,tb in got if tb]
    assert not errors, errors[0]
    assert [p.exitcode for p in procs] == [0]*len(procs)
    return {seed: wrong for seed,wrong,_ in got}

def _check_entries(folder, files):
    "Every entry left equals a fresh decode of its file, and nothing but entries is left (no temporary file)."
    cache = DecodeCache(folder)
    for f in files:
        for s in ('modality', 'display'):
            fn = cache.path(cache.key(f, stage=s, frame=None, window=None, pad_value=None))
            if fn.exists(): np.testing.assert_array_equal(np.load(fn), dicom_pixels(f, stage=s))
    left = [p for p in Path(folder).rglob('*') if p.is_file() and p.suffix != '.npy']
    assert not left, left

def test_spawned_processes_fill_one_cache(tmp_path):
    "Three spawned processes fill one folder at once: every result any of them got equals a fresh decode, every entry left does too, and no temporary file is left."
    files = _big_cts(tmp_path, n=4, size=1024)
    assert _race(tmp_path/'c', files, ['fill']*3) == {0: 0, 1: 0, 2: 0}
    _check_entries(tmp_path/'c', files)
    assert len(DecodeCache(tmp_path/'c')) == 2*len(files)

def test_spawned_processes_clear_while_others_fill(tmp_path):
    "Every rank clearing the cache at start (and at the end) while the others fill it: no process fails, results stay right, nothing half-written or temporary is left."
    files = _big_cts(tmp_path, n=4, size=256)
    cache = DecodeCache(tmp_path/'c')
    for i in range(300): cache._store(cache.path(f'{i:040x}'[::-1]), np.zeros(4, np.float32))   # many entries to clear at once
    assert _race(tmp_path/'c', files, ['clear-fill', 'clear-fill', 'fill']) == {0: 0, 1: 0, 2: 0}
    _check_entries(tmp_path/'c', files)

def test_clear_removes_stale_temporaries_only(tmp_path):
    "A temporary file left by a killed process is removed by `clear()` once it is old; a fresh one (a write under way elsewhere) is not."
    cache = DecodeCache(tmp_path)
    cache(get_testdata_file('CT_small.dcm'))
    d = cache._entries()[0].parent
    stale, fresh = d/'.abc.123.deadbeef.tmp', d/'.abd.124.feedbeef.tmp'
    stale.write_bytes(b'half'); fresh.write_bytes(b'half')
    os.utime(stale, (time.time() - 2*3600,)*2)
    cache.clear()
    assert len(cache) == 0 and not stale.exists() and fresh.exists()

def test_replace_refused_by_a_reader_on_windows(tmp_path, monkeypatch):
    "Windows refuses `os.replace` onto a file another process has mapped: the entry already there (same key) is kept, no error, no temporary left."
    f = get_testdata_file('CT_small.dcm')
    cache, other = DecodeCache(tmp_path), DecodeCache(tmp_path)
    cache(f)
    def refuse(src, dst): raise PermissionError(13, 'Access is denied', str(dst))
    monkeypatch.setattr(os, 'replace', refuse)
    other._store(cache._entries()[0], dicom_pixels(f))
    np.testing.assert_array_equal(cache(f), dicom_pixels(f))
    assert [p.name for p in tmp_path.rglob('*')  if p.is_file()] == [cache._entries()[0].name]
    with pytest.raises(PermissionError): other._store(cache.path('ff' + '0'*38), dicom_pixels(f))   # no entry there: a real error

def _negated(src, **kw): return -dicom_pixels(src, **kw)
def _scaled(src, factor=1., **kw): return factor * dicom_pixels(src, **kw)

def test_decoders_sharing_a_folder(tmp_path):
    "Caches with different decoders on one folder keep their own entries (the decoder is part of the key; dicom_pixels' keys unchanged)."
    import functools
    f = get_testdata_file('CT_small.dcm')
    plain, neg = DecodeCache(tmp_path), DecodeCache(tmp_path, decode=_negated)
    np.testing.assert_array_equal(plain(f), dicom_pixels(f))
    np.testing.assert_array_equal(neg(f), -dicom_pixels(f)); np.testing.assert_array_equal(neg(f), -dicom_pixels(f))
    assert (neg.hits, neg.misses) == (1, 1) and len(plain) == 2
    for k in (2., 3., 2.):                                   # partials told apart by their arguments
        np.testing.assert_array_equal(DecodeCache(tmp_path, decode=functools.partial(_scaled, factor=k))(f), k * dicom_pixels(f))
    assert len(plain) == 4
    assert DecodeCache(tmp_path).key(f) == plain.key(f) != neg.key(f)
