"""The compiled backend (`fastdcm.backend`, the `fast` extra) against pydicom, the reference.

With dicomsdl installed: every installed pydicom test file (and pydicom-data's) read by both; where the backend
accepts a file its stored values and header values equal pydicom's, and where it is wired into `fastdcm.pixels`
(as `_load` would call it) every stage, frame, window and padding choice gives the same output or the same typed
error as without it. Mutated files never crash it or make it raise. Without dicomsdl only the tests that need it
are skipped: the backend then declines everything."""
import ast, contextlib, os, random, subprocess, sys, warnings
from pathlib import Path
import numpy as np, pydicom, pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import keyword_dict
import fastdcm.pixels as pixels
from fastdcm import backend
from fastdcm.backend import load, available, HEADER_KEYWORDS, DECLINE_KEYWORDS
from fastdcm.synth import synth_dicom, synth_bad_files
from conftest import installed_test_files   # and the `no_downloads` fixture

needs_backend = pytest.mark.skipif(not available(), reason='dicomsdl is not installed (pip install fastdcm[fast]): the backend declines every file')

def _pydicom(f):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return pydicom.dcmread(f)

@contextlib.contextmanager
def _without_backend():
    "`fastdcm.pixels` with the backend declining every file: pydicom and pixels' own fast path, the reference."
    orig = backend.load
    backend.load = lambda *a, **k: None
    try: yield
    finally: backend.load = orig

def _reference(f, frame=None):
    "`fastdcm.pixels._load` without the backend: (header, stored), or the exception."
    with _without_backend():
        try: return pixels._load(f, frame)[:2]
        except Exception as e: return e

def test_pixels_reads_through_the_backend():
    "`fastdcm.pixels._load` uses the backend when no header is given (what the tests below compare against pydicom)."
    calls = []
    orig = backend.load
    backend.load = lambda *a, **k: calls.append(a) or orig(*a, **k)
    try: pixels._load(get_testdata_file('CT_small.dcm'))
    finally: backend.load = orig
    assert len(calls) == 1

# ---------------------------------------------------------------------------------------------------------------
# without dicomsdl

def test_declines_without_dicomsdl(monkeypatch):
    "Without the compiled reader `available()` is False and `load` declines every file, so pydicom reads it."
    monkeypatch.setattr(backend, '_sdl', None)
    assert not available()
    assert load(get_testdata_file('CT_small.dcm')) is None

def test_imports_without_dicomsdl():
    "`fastdcm.backend` imports in an environment where dicomsdl can't be imported."
    code = "import sys; sys.modules['dicomsdl'] = None\nfrom fastdcm import backend\nprint(backend.available(), backend.load(sys.argv[1]))"
    out = subprocess.run([sys.executable, '-c', code, get_testdata_file('CT_small.dcm')], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ['False', 'None'], out

def test_keywords_cover_pixels():
    "Every DICOM keyword `fastdcm.pixels` names is carried by the backend's header, sends the file to pydicom, is only read inside a sequence item of such a file, or is read by `fastdcm.volume` from its own datasets: the pipeline can't read a top-level attribute the backend's header lacks (the test below checks the same while the pipeline runs)."
    src = Path(pixels.__file__).read_text()
    named = {n.value for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value and n.value in keyword_dict}
    inside_declined = {'LUTDescriptor', 'LUTData', 'LUTExplanation', 'FrameVOILUTSequence', 'PixelValueTransformationSequence',
                       'TransferSyntaxUID', 'MediaStorageSOPClassUID',   # file meta: the backend's is its own transfer syntax
                       'PixelData', 'ModalityLUTType',   # pydicom's full read only
                       'SOPClassUID'}   # only for a file without Pixel Data, which the backend never accepts
    volume_only = {'ImagePositionPatient', 'ImageOrientationPatient', 'PixelSpacing', 'SliceThickness', 'InstanceNumber',
                   'SeriesNumber', 'ImageType', 'Modality', 'SeriesInstanceUID', 'StudyInstanceUID'}   # `_get`'s fast reads for fastdcm.volume
    assert set(pixels._RAW_KINDS) - volume_only <= set(HEADER_KEYWORDS)
    missing = named - set(HEADER_KEYWORDS) - set(DECLINE_KEYWORDS) - inside_declined - volume_only
    assert not missing, f'fastdcm.pixels reads {sorted(missing)}: add them to backend.HEADER_KEYWORDS or DECLINE_KEYWORDS'

@needs_backend
def test_pipeline_reads_only_header_keywords(tmp_path, monkeypatch, no_downloads):
    "While every stage runs on the files the backend accepts, the pipeline asks the backend's `Header` only for `HEADER_KEYWORDS` (present or not) and `DECLINE_KEYWORDS` (always absent there): a keyword outside them would silently read as absent."
    asked = set()
    class Recording(backend.Header):
        def get(self, k, default=None): asked.add(k); return super().get(k, default)
        def __contains__(self, k): asked.add(k); return super().__contains__(k)
        def __getitem__(self, k): asked.add(k); return super().__getitem__(k)
    monkeypatch.setattr(backend, 'Header', Recording)
    files = [f for f in installed_test_files() if load(f) is not None] + _synth_variants(tmp_path)
    for f in files:
        if load(f) is None: continue
        for k in _CALLS: _outcome(pixels.dicom_pixels, f, **k)
        pixels.padding_mask(f)
    assert {'Rows', 'RescaleSlope', 'WindowCenter', 'PhotometricInterpretation'} <= asked   # the recording works
    assert asked <= set(HEADER_KEYWORDS) | set(DECLINE_KEYWORDS), sorted(asked - set(HEADER_KEYWORDS) - set(DECLINE_KEYWORDS))

# ---------------------------------------------------------------------------------------------------------------
# stored values and header values: backend vs pydicom on every installed test file

@needs_backend
def test_stored_values_equal_pydicom(no_downloads):
    "On every installed pydicom test file the backend accepts, stored values (all frames and single frames) and header values equal pydicom's; `fastdcm.pixels` without the backend agrees (so no file it refuses is accepted)."
    files = installed_test_files()
    assert len(files) >= 60
    accepted = []
    for f in files:
        res = load(f)
        if res is None: continue
        accepted.append(Path(f).name)
        hdr, stored = res
        ds = _pydicom(f)
        ref = ds.pixel_array
        assert (stored.dtype, stored.shape) == (ref.dtype, ref.shape), f
        assert np.array_equal(stored, ref), f
        nf = int(ds.get('NumberOfFrames') or 1)
        for i in sorted({0, nf // 2, nf - 1}):
            assert np.array_equal(load(f, frame=i)[1], ref[i] if nf > 1 else ref), (f, i)
        assert load(f, frame=nf) is None and load(f, frame=-1) is None
        for kw in HEADER_KEYWORDS:   # pydicom's values, several values as a tuple; absent or empty alike
            ref_v = ds.get(kw)
            ref_v = tuple(ref_v) if isinstance(ref_v, pydicom.multival.MultiValue) else ref_v
            assert hdr.get(kw) in ((None, '') if ref_v in (None, '') else (ref_v,)), (f, kw, hdr.get(kw), ref_v)
            assert type(hdr.get(kw)) in (int, float, str, tuple, type(None)), (f, kw)
        assert hdr.transfer_syntax == ds.file_meta.TransferSyntaxUID
        r = _reference(f)
        assert not isinstance(r, Exception), (f, r)
        assert np.array_equal(r[1], stored), f
    assert len(accepted) >= 15, accepted   # every native monochrome file without LUT sequences or functional groups (17 here)
    assert {'CT_small.dcm', 'MR_small_implicit.dcm', 'emri_small.dcm'} <= set(accepted)

# ---------------------------------------------------------------------------------------------------------------
# every stage through fastdcm.pixels with the backend wired in, vs without

def _synth_variants(d):
    "Files from fastdcm.synth covering what the pipeline does with the header: windows and their functions, MONOCHROME1, padding values and ranges, bit depths, signedness, multi-frame, implicit VR; and what the backend must leave to pydicom."
    d = Path(d)
    v = dict(
        ct=dict(modality='CT', windows=[(40, 400, 'SOFT'), (-600, 1500, 'LUNG')]),
        ct_sigmoid=dict(modality='CT', windows=[(40, 400)], voi_function='SIGMOID'),
        ct_pad=dict(modality='CT', padding_value=-2000, windows=[(40, 400)]),
        ct_pad_range=dict(modality='CT', padding_value=-2000, padding_range=-1500),
        ct_implicit=dict(modality='CT', transfer_syntax='implicit', slope=0.5, intercept=-100.),
        mr12=dict(modality='MR', bits_stored=12, signed=False),
        cr_mono1=dict(modality='CR', photometric='MONOCHROME1', bits_stored=12, signed=False, windows=[(2000, 3000)]),
        dx_mono1_nowin=dict(modality='DX', photometric='MONOCHROME1', bits_stored=8, signed=False),
        ct_frames=dict(modality='CT', frames=3, windows=[(40, 400)]),
        ct_voi_lut=dict(modality='CT', voi_lut=True),             # declined: VOI LUT Sequence
        ct_modality_lut=dict(modality='CT', modality_lut=True),   # declined: Modality LUT Sequence
        ct_enhanced=dict(modality='CT', enhanced=True, frames=3, windows=[(40, 400)]),   # declined: functional groups
        ct_rle=dict(modality='CT', compress='rle'),               # declined: compressed
    )
    out = []
    for name, kw in v.items():
        out.append(synth_dicom(d/f'{name}.dcm', size=32, seed=len(out), **kw))
    return out

def _outcome(fn, *a, **k):
    try: return fn(*a, **k)
    except Exception as e: return e

def _same(a, b, what):
    if isinstance(a, Exception) or isinstance(b, Exception):
        assert type(a) is type(b) and str(a) == str(b), (what, a, b)
    else:
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True), what

_CALLS = [dict(stage=s) for s in pixels.STAGES] + [
    dict(stage='display', window=1), dict(stage='display', window='LUNG'), dict(stage='display', window=(50, 350)),
    dict(stage='display', window=(50, 350, 'LINEAR_EXACT')), dict(stage='display', window=5),
    dict(stage='modality', pad_value=-5000.), dict(stage='stored', pad_value=0.), dict(stage='modality', frame=1),
    dict(stage='display', frame=2), dict(stage='modality', frame=7)]

@needs_backend
def test_every_stage_equal_with_backend_wired(tmp_path, monkeypatch, no_downloads):
    "`dicom_pixels` at every stage (frames, windows by index/name/values/function, pad values) and `padding_mask` give the same arrays, or the same typed errors, with the backend (as `fastdcm.pixels._load` ships) as without it."
    files = [f for f in installed_test_files() if load(f) is not None]
    files += _synth_variants(tmp_path) + list(synth_bad_files(tmp_path/'bad').values())
    used = 0
    for f in files:
        calls = [(pixels.dicom_pixels, k) for k in _CALLS] + [(pixels.padding_mask, {}), (pixels.padding_mask, dict(frame=1))]
        with _without_backend(): before = [_outcome(fn, f, **k) for fn, k in calls]
        used += load(f) is not None
        after = [_outcome(fn, f, **k) for fn, k in calls]     # pixels as shipped: the backend first when it accepts
        for (fn, k), a, b in zip(calls, before, after): _same(a, b, (Path(f).name, fn.__name__, k))
    assert used >= 20   # 17 pydicom files, 9 synth variants

@needs_backend
def test_bad_files_declined(tmp_path):
    "Every bad file `fastdcm.synth` writes is left to pydicom, which raises the typed error; a bad window is the pipeline's to refuse (same error either way: the test above)."
    bad = synth_bad_files(tmp_path)
    assert load(bad.pop('bad_window')) is not None
    for case, f in bad.items(): assert load(f) is None, case

# ---------------------------------------------------------------------------------------------------------------
# fuzzing: mutated files never crash the backend, never make it raise, never give other values than the reference

def _mutants(src:bytes, rng, n):
    "`n` mutated copies of `src`: cut at random points, bytes overwritten in the header, element lengths changed."
    end = src.find(b'\xe0\x7f\x10\x00') if b'\xe0\x7f\x10\x00' in src else len(src)
    for i in range(n):
        b = bytearray(src)
        kind = i % 3
        if kind == 0: b = b[:rng.randrange(0, len(src))]
        elif kind == 1:
            for _ in range(rng.randint(1, 4)):
                p = rng.randrange(128, end + 12); b[p] = rng.randrange(256)
        else:   # a value length two bytes after a VR: make it lie
            p = rng.randrange(132, end + 12)
            b[p:p+2] = rng.choice([b'\xff\xff', b'\x00\x00', b'\x01\x00', b'\xfe\xff'])
        yield bytes(b)

@needs_backend
def test_fuzz_never_crashes_or_disagrees(tmp_path):
    "Mutated CT and multi-frame files: the backend returns None or the reference path's stored values, and never raises."
    rng = random.Random(13)
    sources = [Path(get_testdata_file('CT_small.dcm')).read_bytes(), Path(get_testdata_file('MR_small_implicit.dcm')).read_bytes(),
               synth_dicom(tmp_path/'f3.dcm', modality='CT', frames=3, size=16).read_bytes()]
    taken = 0
    for s, src in enumerate(sources):
        for i, data in enumerate(_mutants(src, rng, 120)):
            f = tmp_path/f'm{s}_{i}.dcm'; f.write_bytes(data)
            res = load(f)   # an exception here fails the test: the backend must decline, not raise
            if res is None: continue
            taken += 1
            ref = _reference(f)
            assert not isinstance(ref, Exception), (f.name, ref)
            assert np.array_equal(res[1], ref[1]) and res[1].dtype == ref[1].dtype, f.name
    assert taken > 0   # some mutants (values changed, not structure) are still read

# ---------------------------------------------------------------------------------------------------------------
# the checks that no test file exercises: unused high bits, the Pixel Data tag's bytes inside an earlier value

@needs_backend
@pytest.mark.parametrize('signed', [True, False])
def test_bits_stored_below_bits_allocated(tmp_path, signed):
    "12 of 16 bits stored with garbage in the 4 unused high bits (PS3.5 8.1.1): masked (unsigned) or sign-extended (signed) as pydicom does."
    f = synth_dicom(tmp_path/'mr12.dcm', modality='MR', bits_stored=12, signed=signed, size=16)
    ds = pydicom.dcmread(f)
    raw = (np.frombuffer(ds.PixelData, '<u2') & 0x0FFF) | 0xA000
    if signed: raw[:4] = [0x0FFF, 0x0800, 0x07FF, 0xF001]   # -1, -2048, 2047, 1
    ds.PixelData = raw.astype('<u2').tobytes(); ds.save_as(f)
    ref = pydicom.dcmread(f).pixel_array
    got = load(f)[1]
    assert got.dtype == ref.dtype and np.array_equal(got, ref)
    assert got.max() < 2**12 if not signed else list(got.ravel()[:4]) == [-1, -2048, 2047, 1]

@needs_backend
@pytest.mark.parametrize('transfer_syntax', ['explicit', 'implicit'])
def test_icon_pixel_data_before_the_image(tmp_path, transfer_syntax):
    "An Icon Image Sequence (0088,0200; PS3.3 C.7.6.1) holds its own Pixel Data element before the image's, here of the same length: the backend reads the image's (a top-level element), never the icon's."
    f = synth_dicom(tmp_path/'ct.dcm', modality='CT', size=16, transfer_syntax=transfer_syntax)
    ds = pydicom.dcmread(f)
    icon = pydicom.Dataset()
    for k in ('SamplesPerPixel', 'PhotometricInterpretation', 'Rows', 'Columns', 'BitsAllocated', 'BitsStored', 'HighBit', 'PixelRepresentation'):
        setattr(icon, k, getattr(ds, k))
    icon.PixelData = (np.arange(16*16, dtype='<i2') * 7).tobytes()
    ds.IconImageSequence = pydicom.Sequence([icon])
    ds.save_as(f)
    ref = pydicom.dcmread(f).pixel_array
    res = load(f)
    assert res is not None and np.array_equal(res[1], ref)

@needs_backend
@pytest.mark.parametrize('extra', [10_000, 40_000, 300_000])
def test_header_longer_than_the_first_read(tmp_path, extra):
    "A header running past the first read (`backend._HEAD`, a long private value before the image) is read on until the Pixel Data element: the same stored values and header as pydicom's."
    f = synth_dicom(tmp_path/'ct.dcm', modality='CT', size=16, windows=[(40, 400)])
    ds = pydicom.dcmread(f)
    ds.add_new(0x00291010, 'OB', bytes(range(256)) * (extra // 256))   # a vendor's private blob, as in CSA headers
    ds.save_as(f)
    res = load(f)
    assert res is not None
    ref = pydicom.dcmread(f)
    assert np.array_equal(res[1], ref.pixel_array) and res[0].get('WindowCenter') == ref.WindowCenter

# ---------------------------------------------------------------------------------------------------------------
# JPEG 2000 threads: several only where nothing else decodes beside the call

def _threads_in_child(q): q.put(backend.decode_threads())

def test_decode_threads_one_beside_other_decodes(monkeypatch):
    "In the main thread of the main process as many threads as CPUs this process may use (at most 8); one in a pool's thread, one in a process `multiprocessing` started (as a DataLoader worker is); `FASTDCM_DECODE_THREADS` wins."
    import concurrent.futures as cf, multiprocessing as mp
    monkeypatch.delenv('FASTDCM_DECODE_THREADS', raising=False)
    assert backend.decode_threads() == max(1, min(8, len(os.sched_getaffinity(0))))
    with cf.ThreadPoolExecutor(1) as ex: assert ex.submit(backend.decode_threads).result() == 1
    ctx = mp.get_context('fork'); q = ctx.Queue(); p = ctx.Process(target=_threads_in_child, args=(q,)); p.start()
    try: assert q.get(timeout=60) == 1
    finally: p.join(60)
    monkeypatch.setenv('FASTDCM_DECODE_THREADS', '5')
    assert backend.decode_threads() == 5
    with cf.ThreadPoolExecutor(1) as ex: assert ex.submit(backend.decode_threads).result() == 5
    monkeypatch.setenv('FASTDCM_DECODE_THREADS', 'lots')
    with pytest.raises(ValueError, match='FASTDCM_DECODE_THREADS'): backend.decode_threads()

def test_j2k_decoder_leaves_pydicoms_decoders_alone():
    "fastdcm's JPEG 2000 decoder is its own pydicom `Decoder`: pydicom's registry (what a user's `ds.pixel_array` uses) gains no plugin."
    pytest.importorskip('imagecodecs')
    import pydicom.uid as U
    from pydicom.pixels import get_decoder
    before = {u: get_decoder(u).available_plugins for u in (U.JPEG2000Lossless, U.JPEG2000, U.HTJ2KLossless)}
    for u in before: assert backend.j2k_decoder(u).available_plugins == ('imagecodecs',)
    assert {u: get_decoder(u).available_plugins for u in before} == before
    assert backend.j2k_decoder(U.JPEGLSLossless) is None and backend.j2k_decoder(U.RLELossless) is None
