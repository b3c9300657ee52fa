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
