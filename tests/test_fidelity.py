"""Fidelity acceptance for fastdcm.pixels (issue 2).

1. Every file in pydicom's data/test_files that pydicom decodes, with one sample per pixel: 'modality' equals
   `apply_modality_lut(pixel_array, ds)` on all non-padding pixels, and 'display' with each header window equals
   `apply_windowing` rescaled to [0, 1] (inverted for MONOCHROME1).
2. What pydicom doesn't do, against expectations computed here from the PS3.3 formulas, on files written here
   with pydicom: enhanced multi-frame rescale/windows (functional groups), padding, MONOCHROME1 after SIGMOID and
   LINEAR_EXACT, VOI LUT Sequence.
3. Each bad-input class raises its typed DicomError naming the file.
"""
import os, warnings
from pathlib import Path
import numpy as np, pytest, pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, generate_uid
from pydicom.pixels import apply_modality_lut, apply_windowing, apply_voi
from pydicom.data import get_testdata_file
from fastdcm.core import *
from fastdcm.pixels import *
from fastdcm.pixels import _load

TEST_DIR = Path(get_testdata_file('CT_small.dcm')).parent
ALL_FILES = sorted(p for p in TEST_DIR.iterdir() if p.is_file())

def _pydicom_gray(p):
    "(ds, pixel_array) when pydicom decodes `p` and it has one sample per pixel, else None."
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            ds = pydicom.dcmread(p)
            if int(ds.get('SamplesPerPixel', 1)) != 1: return None
            return ds, ds.pixel_array
    except Exception: return None

# pydicom trims Pixel Data longer than the geometry (with a warning); we refuse it (a header lying about its geometry
# looks the same): a PixelDataLengthError, tested in test_pixels.py
TOO_LONG = {'MR_small_padded.dcm'}
GRAY = [p for p in ALL_FILES if p.name not in TOO_LONG and _pydicom_gray(p) is not None]

def test_sweep_is_not_empty():
    assert len(GRAY) >= 25, [p.name for p in GRAY]

def _range(a): return max(float(a.max()) - float(a.min()), 1.)

@pytest.mark.parametrize('p', GRAY, ids=lambda p: p.name)
def test_modality_matches_pydicom(p):
    ds, arr = _pydicom_gray(p)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ref = apply_modality_lut(arr, ds).astype(np.float64)
    ours = dicom_pixels(p, 'modality')
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    real = ~padding_mask(p)
    # the pixels left out of the comparison are exactly the padding, judged here from pydicom's stored values
    if 'PixelPaddingValue' not in ds: assert real.all()
    elif 'PixelPaddingRangeLimit' not in ds:
        ppv = int(ds.PixelPaddingValue)
        if int(ds.PixelRepresentation) == 1 and ppv >= 2**15: ppv -= 2**16
        np.testing.assert_array_equal(~real, arr == ppv)
    np.testing.assert_allclose(ours[real], ref[real], rtol=0, atol=1e-3*_range(ref))
    if (~real).any(): assert ours[~real].max() <= ours[real].min()

def _pydicom_display(mod, ds, index):
    "pydicom's windowing output mapped from its own output range (from Bits Stored and rescale) to [0, 1]."
    y = apply_windowing(mod, ds, index)
    bs = int(ds.BitsStored)
    lo, hi = (0, 2**bs - 1) if int(ds.PixelRepresentation) == 0 else (-2**(bs-1), 2**(bs-1) - 1)
    if 'RescaleSlope' in ds and 'RescaleIntercept' in ds:
        s, b = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = lo*s + b, hi*s + b
    y = (y - lo) / (hi - lo)
    return 1 - y if ds.PhotometricInterpretation == 'MONOCHROME1' else y

WINDOWED = [(p, i) for p in GRAY for i in range(len(header_windows(pydicom.dcmread(p, stop_before_pixels=True))))]

def test_windowed_sweep_is_not_empty(): assert len(WINDOWED) >= 10

@pytest.mark.parametrize('p,i', WINDOWED, ids=lambda o: o.name if isinstance(o, Path) else str(o))
def test_display_matches_pydicom_windowing(p, i):
    ds, arr = _pydicom_gray(p)
    ref = _pydicom_display(apply_modality_lut(arr, ds), ds, i)
    ours = dicom_pixels(p, 'display', window=i)
    assert ours.dtype == np.float32 and 0 <= ours.min() and ours.max() <= 1
    real = ~padding_mask(p)
    np.testing.assert_allclose(ours[real], ref[real], rtol=0, atol=1e-3)
    if i == 0: np.testing.assert_array_equal(dicom_pixels(p, 'display'), ours)

# ---------------------------------------------------------------- files pydicom can't judge: written here

def write_dicom(fn, arr, bits_stored=None, photometric='MONOCHROME2', ts=ExplicitVRLittleEndian, pixel_bytes=None, **tags):
    "Write `arr` ((H,W) or (F,H,W) integer array) as a minimal valid DICOM file with pydicom; `tags` set afterwards."
    arr = np.asarray(arr)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    ds = Dataset(); ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = 'OT', 'FIDELITY'
    ds.Rows, ds.Columns = arr.shape[-2:]
    if arr.ndim == 3: ds.NumberOfFrames = arr.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = arr.dtype.itemsize*8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(arr.dtype.kind == 'i')
    for k, v in tags.items(): setattr(ds, k, v)
    ds.PixelData = pixel_bytes if pixel_bytes is not None else arr.astype(arr.dtype.newbyteorder('>' if ts == ExplicitVRBigEndian else '<')).tobytes()
    ds['PixelData'].VR = 'OW' if ds.BitsAllocated > 8 else 'OB'
    ds.save_as(fn, enforce_file_format=True)
    return Path(fn)

def _seq(**kw):
    d = Dataset()
    for k, v in kw.items(): setattr(d, k, v)
    if 'LUTData' in d: d['LUTData'].VR = 'US'   # ambiguous US/OW: a list of values is US
    return [d]

def lin(x, c, w):   # PS3.3 C.11.2.1.2.1 LINEAR, written out
    return np.where(x <= c-0.5-(w-1)/2, 0., np.where(x > c-0.5+(w-1)/2, 1., (x-(c-0.5))/(w-1)+0.5))
def lin_exact(x, c, w):   # C.11.2.1.3.2 LINEAR_EXACT
    return np.where(x <= c-w/2, 0., np.where(x > c+w/2, 1., (x-c)/w+0.5))
def sigmoid(x, c, w):   # C.11.2.1.3.1 SIGMOID
    return 1/(1+np.exp(-4*(x-c)/w))

RNG = np.random.default_rng(0)
STORED = RNG.integers(-1000, 3000, size=(3, 16, 12)).astype(np.int16)

@pytest.fixture
def enhanced(tmp_path):
    "3 frames: shared rescale (2, -100) and window (500, 1000); frame 1 overrides rescale, frame 2 overrides the window; top-level tags are decoys."
    shared = Dataset()
    shared.PixelValueTransformationSequence = _seq(RescaleSlope=2, RescaleIntercept=-100, RescaleType='US')
    shared.FrameVOILUTSequence = _seq(WindowCenter=500, WindowWidth=1000, WindowCenterWidthExplanation='SHARED')
    frames = [Dataset() for _ in range(3)]
    frames[1].PixelValueTransformationSequence = _seq(RescaleSlope=0.5, RescaleIntercept=10, RescaleType='US')
    frames[2].FrameVOILUTSequence = _seq(WindowCenter=[100, 0], WindowWidth=[300, 50],
                                         WindowCenterWidthExplanation=['SOFT', 'NARROW'], VOILUTFunction='LINEAR_EXACT')
    return write_dicom(tmp_path/'enhanced.dcm', STORED, SharedFunctionalGroupsSequence=[shared],
                       PerFrameFunctionalGroupsSequence=frames, RescaleSlope=7, RescaleIntercept=7,
                       WindowCenter=9999, WindowWidth=1)

SLOPES, INTERCEPTS = np.array([2, .5, 2]), np.array([-100, 10, -100])

def test_enhanced_per_frame_rescale(enhanced):
    exp = STORED * SLOPES[:, None, None] + INTERCEPTS[:, None, None]
    np.testing.assert_allclose(dicom_pixels(enhanced), exp, atol=1e-4)
    for i in range(3): np.testing.assert_allclose(dicom_pixels(enhanced, frame=i), exp[i], atol=1e-4)
    out = np.full(exp.shape, np.nan, np.float32)                         # per frame, in place
    assert dicom_pixels(enhanced, out=out) is out; np.testing.assert_allclose(out, exp, atol=1e-4)
    # pydicom reads the top-level decoy (issue 2353): we must not agree with it
    ds = pydicom.dcmread(enhanced)
    assert not np.allclose(apply_modality_lut(ds.pixel_array, ds), exp)

def test_enhanced_per_frame_windows(enhanced):
    mod = STORED * SLOPES[:, None, None] + INTERCEPTS[:, None, None]
    ds = pydicom.dcmread(enhanced, stop_before_pixels=True)
    assert header_windows(ds, 0) == [(500., 1000., 'SHARED', 'LINEAR')]
    assert header_windows(ds, 2) == [(100., 300., 'SOFT', 'LINEAR_EXACT'), (0., 50., 'NARROW', 'LINEAR_EXACT')]
    exp = np.stack([lin(mod[0], 500, 1000), lin(mod[1], 500, 1000), lin_exact(mod[2], 100, 300)])
    np.testing.assert_allclose(dicom_pixels(enhanced, 'display'), exp, atol=1e-5)
    np.testing.assert_allclose(dicom_pixels(enhanced, 'display', frame=2, window='narrow'), lin_exact(mod[2], 0, 50), atol=1e-5)
    with pytest.raises(BadWindowError, match='enhanced.dcm'): dicom_pixels(enhanced, 'display', frame=0, window='narrow')

def test_fast_path_matches_pydicom_on_enhanced(enhanced):
    for stage in ('stored', 'modality', 'display'):
        np.testing.assert_array_equal(dicom_pixels(enhanced, stage), dicom_pixels(pydicom.dcmread(enhanced), stage))

@pytest.mark.parametrize('function,formula', [('SIGMOID', sigmoid), ('LINEAR_EXACT', lin_exact), ('LINEAR', lin)])
def test_monochrome1_inverted_after_voi(tmp_path, function, formula):
    st = RNG.integers(0, 4096, size=(20, 20)).astype(np.uint16)
    f = write_dicom(tmp_path/'m1.dcm', st, bits_stored=12, photometric='MONOCHROME1', RescaleSlope=1, RescaleIntercept=-1000,
                    WindowCenter=[800, 100], WindowWidth=[1200, 400], VOILUTFunction=function)
    mod = st - 1000.
    np.testing.assert_allclose(dicom_pixels(f, 'display'), 1 - formula(mod, 800, 1200), atol=1e-5)
    np.testing.assert_allclose(dicom_pixels(f, 'display', window=1), 1 - formula(mod, 100, 400), atol=1e-5)
    # inverting before the window would give formula(-mod...), a different image
    assert not np.allclose(dicom_pixels(f, 'display'), formula(mod.max() + mod.min() - mod, 800, 1200), atol=1e-2)

def test_presentation_lut_shape_inverse(tmp_path):
    st = RNG.integers(0, 4096, size=(8, 8)).astype(np.uint16)
    f = write_dicom(tmp_path/'inv.dcm', st, bits_stored=12, PresentationLUTShape='INVERSE', WindowCenter=2000, WindowWidth=1000)
    np.testing.assert_allclose(dicom_pixels(f, 'display'), 1 - lin(st*1., 2000, 1000), atol=1e-6)

@pytest.mark.parametrize('photometric', ['MONOCHROME2', 'MONOCHROME1'])
def test_presentation_lut_sequence(tmp_path, photometric):
    "A Presentation LUT Sequence (PS3.3 C.11.4) maps the VOI output, as 256 P-values of 10 bits; it replaces the inversion."
    st = RNG.integers(0, 4096, size=(8, 8)).astype(np.uint16)
    table = np.round(1023 * (np.arange(256)/255)**0.5).astype(np.uint16)        # a gamma curve, first mapped 0
    f = write_dicom(tmp_path/'plut.dcm', st, bits_stored=12, photometric=photometric, WindowCenter=2000, WindowWidth=1000,
                    PresentationLUTSequence=_seq(LUTDescriptor=[256, 0, 10], LUTData=table.tolist()))
    voi = lin(st*1., 2000, 1000)
    exp = table[np.rint(voi*255).astype(int)] / 1023
    np.testing.assert_allclose(dicom_pixels(f, 'display'), exp, atol=1e-6)
    assert not np.allclose(dicom_pixels(f, 'display'), voi, atol=1e-2)       # the table did something

def test_padding_value_signed_12bit(tmp_path):
    st = RNG.integers(-500, 1500, size=(16, 16)).astype(np.int16)
    st[:3] = -2000; st[-1, :4] = -2001  # -2001 is below padding but not padding
    f = write_dicom(tmp_path/'pad.dcm', st, bits_stored=12, RescaleSlope=1, RescaleIntercept=-1024, PixelPaddingValue=-2000)
    m = padding_mask(f)
    np.testing.assert_array_equal(m, st == -2000)
    mod = dicom_pixels(f)
    real = (st[~m] - 1024.)
    np.testing.assert_allclose(mod[~m], real)
    assert (mod[m] == real.min()).all() and real.min() == -2001 - 1024
    assert (dicom_pixels(f, pad_value=-5000)[m] == -5000).all()
    assert (dicom_pixels(f, 'display', window=(0, 400))[m] == 0).all()
    full = dicom_pixels(f, 'display')   # no header window: min..max of the real values
    np.testing.assert_allclose(full[~m], (real - real.min())/(real.max() - real.min()), atol=1e-6)
    np.testing.assert_array_equal(dicom_pixels(f, 'stored'), st)

def test_padding_range_inclusive(tmp_path):
    st = np.arange(64, dtype=np.uint16).reshape(8, 8) * 50   # 0..3150
    f = write_dicom(tmp_path/'padr.dcm', st, PixelPaddingValue=3000, PixelPaddingRangeLimit=100, RescaleSlope=2, RescaleIntercept=0)
    m = padding_mask(f)
    np.testing.assert_array_equal(m, (st >= 100) & (st <= 3000))   # inclusive, either order
    mod = dicom_pixels(f)
    assert (mod[m] <= mod[~m].min()).all()
    np.testing.assert_allclose(mod[~m], st[~m]*2.)

def test_voi_lut_sequence(tmp_path):
    st = np.arange(100, dtype=np.uint16).reshape(10, 10)
    table = (np.arange(50)**2).astype(np.uint16)   # entries 0..2401, 12 bits, first mapped 20
    f = write_dicom(tmp_path/'voilut.dcm', st, VOILUTSequence=_seq(LUTDescriptor=[50, 20, 12], LUTData=table.tolist(), LUTExplanation='SQUARE'))
    exp = table[np.clip(st.astype(int) - 20, 0, 49)] / 4095
    np.testing.assert_allclose(dicom_pixels(f, 'display'), exp, atol=1e-6)
    np.testing.assert_allclose(dicom_pixels(f, 'display', window='square'), exp, atol=1e-6)
    ds = pydicom.dcmread(f)
    np.testing.assert_allclose(dicom_pixels(f, 'display'), apply_voi(ds.pixel_array, ds) / 4095, atol=1e-6)

def test_modality_lut_sequence_matches_pydicom(tmp_path):
    st = RNG.integers(0, 300, size=(12, 12)).astype(np.uint16)
    table = (4095 - np.arange(256)*10).astype(np.uint16)
    f = write_dicom(tmp_path/'mlut.dcm', st, ModalityLUTSequence=_seq(LUTDescriptor=[256, 10, 16], LUTData=table.tolist()))
    ds = pydicom.dcmread(f)
    np.testing.assert_allclose(dicom_pixels(f), apply_modality_lut(ds.pixel_array, ds))
    out = np.full(st.shape, np.nan, np.float32)                          # the LUT written in place
    assert dicom_pixels(f, out=out) is out; np.testing.assert_allclose(out, apply_modality_lut(ds.pixel_array, ds))

@pytest.mark.parametrize('dtype,bits', [(np.int16, 12), (np.uint16, 12), (np.int8, 6), (np.uint8, 8), (np.int32, 20), (np.uint32, 32)])
def test_fast_path_unused_bits(tmp_path, dtype, bits):
    "High bits beyond Bits Stored hold garbage: masked (unsigned) or sign-extended (signed), as pydicom does."
    lo, hi = (-2**(bits-1), 2**(bits-1)) if np.dtype(dtype).kind == 'i' else (0, 2**bits)
    st = RNG.integers(lo, hi, size=(2, 6, 5)).astype(dtype)
    raw = st.view(f'u{st.itemsize}').copy()
    if bits < st.itemsize*8: raw ^= np.array((0b1010 << bits) & (2**(st.itemsize*8) - 1), raw.dtype)   # garbage in the unused bits
    f = write_dicom(tmp_path/'bits.dcm', st, bits_stored=bits, pixel_bytes=raw.astype(raw.dtype.newbyteorder('<')).tobytes())
    ds, raw_ours, _ = _load(f)   # the fast path's integers, before float32
    assert ds.get('PixelData') is None and raw_ours.dtype == st.dtype
    np.testing.assert_array_equal(raw_ours, st)
    np.testing.assert_array_equal(raw_ours, pydicom.dcmread(f).pixel_array)
    np.testing.assert_array_equal(_load(f, frame=1)[1], st[1])
    np.testing.assert_allclose(dicom_pixels(f, 'stored'), st, rtol=1e-7)   # float32: exact up to 24 bits

def test_big_endian_and_implicit_agree(tmp_path):
    st = RNG.integers(-1000, 1000, size=(9, 7)).astype(np.int16)
    kw = dict(RescaleSlope=1.5, RescaleIntercept=3, WindowCenter=0, WindowWidth=500)
    outs = [dicom_pixels(write_dicom(tmp_path/f'{i}.dcm', st, ts=ts, **kw), 'display')
            for i, ts in enumerate((ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian))]
    for o in outs[1:]: np.testing.assert_array_equal(o, outs[0])
    np.testing.assert_allclose(outs[0], lin(st*1.5+3, 0, 500), atol=1e-6)

# ---------------------------------------------------------------- bad input: typed errors naming the file

def test_truncated(tmp_path):
    b = Path(get_testdata_file('CT_small.dcm')).read_bytes()
    for n in (600, 1000, 3000, len(b) - 1000):   # cut inside the header, cut inside the pixel data
        f = tmp_path/f'cut{n}.dcm'; f.write_bytes(b[:n])
        with pytest.raises(TruncatedDicomError, match=f'cut{n}.dcm'): dicom_pixels(f)

def test_not_dicom(tmp_path):
    f = tmp_path/'photo.dcm'; f.write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(300))
    with pytest.raises(NotDicomError, match='photo.dcm'): dicom_pixels(f)

def test_no_pixel_data(tmp_path):
    with pytest.raises(NoPixelDataError, match='rtplan.dcm') as e: dicom_pixels(get_testdata_file('rtplan.dcm'))
    assert not isinstance(e.value, TruncatedDicomError)
    # an image header without Pixel Data: most likely a cut file, so both a NoPixelDataError and a TruncatedDicomError
    ds = pydicom.dcmread(get_testdata_file('CT_small.dcm')); del ds.PixelData
    f = tmp_path/'nopix.dcm'; ds.save_as(f)
    for src in (f, pydicom.dcmread(f)):
        with pytest.raises(NoPixelDataError, match='nopix.dcm') as e: dicom_pixels(src)
        assert isinstance(e.value, TruncatedDicomError)

def test_short_pixel_data(tmp_path):
    st = np.zeros((32, 32), np.int16)
    f = write_dicom(tmp_path/'short.dcm', st, pixel_bytes=st.tobytes()[:1000])
    with pytest.raises(PixelDataLengthError, match='short.dcm'): dicom_pixels(f)
    with pytest.raises(PixelDataLengthError, match='short.dcm'): dicom_pixels(pydicom.dcmread(f))

def test_bad_windows():
    f = get_testdata_file('examples_overlay.dcm')   # two windows: WINDOW1, WINDOW2
    np.testing.assert_array_equal(dicom_pixels(f, 'display', window='window2'), dicom_pixels(f, 'display', window=1))
    for bad in (2, -1, 'LUNG', (40, 0), (40, -5), (40, 0.5), ('a', 'b'), (40, 400, 'GAMMA'), True, 3.5, (1, 2, 3, 4)):
        with pytest.raises(BadWindowError, match='examples_overlay.dcm'): dicom_pixels(f, 'display', window=bad)

def test_bad_window_in_header(tmp_path):
    f = write_dicom(tmp_path/'badwin.dcm', np.zeros((4, 4), np.uint16), WindowCenter=10, WindowWidth=0)
    with pytest.raises(BadWindowError, match='badwin.dcm'): dicom_pixels(f, 'display')
    assert dicom_pixels(f, 'modality').shape == (4, 4)   # only the display stage needs the window

def test_unsupported_transfer_syntax_names_plugin(monkeypatch):
    "Pretend no JPEG 2000 plugin is installed: the error names the file and the package to install."
    f = get_testdata_file('MR_small_jp2klossless.dcm')
    dec = pydicom.pixels.get_decoder(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    monkeypatch.setattr(dec, '_available', {})
    monkeypatch.setattr(dec, '_unavailable', {'pylibjpeg': ('numpy', 'pylibjpeg', 'pylibjpeg-openjpeg')})
    with pytest.raises(UnsupportedTransferSyntaxError, match=r'MR_small_jp2klossless.dcm.*pylibjpeg-openjpeg'): dicom_pixels(f)

def test_transfer_syntax_without_any_decoder(tmp_path):
    ds = pydicom.dcmread(get_testdata_file('JPEG2000.dcm'))
    ds.file_meta.TransferSyntaxUID = '1.2.840.10008.1.2.4.100'   # MPEG2: pydicom has no image decoder
    f = tmp_path/'video.dcm'; ds.save_as(f)
    with pytest.raises(UnsupportedTransferSyntaxError, match='video.dcm'): dicom_pixels(f)

def test_other_decode_failures_are_typed():
    for n in ('JPEG2000-embedded-sequence-delimiter.dcm', 'badVR.dcm', 'nested_priv_SQ.dcm'):
        with pytest.raises(DicomError, match=n): dicom_pixels(get_testdata_file(n))
