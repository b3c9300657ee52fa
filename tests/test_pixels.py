"Tests for fastdcm.pixels beyond the notebook: import hygiene, fast path vs pydicom path, bad input, enhanced multi-frame."
import subprocess, sys
from pathlib import Path
import numpy as np, pytest, pydicom
from pydicom.data import get_testdata_file
from fastdcm.core import *
from fastdcm.pixels import *
from fastdcm.pixels import PixelDecodeError, FrameIndexError, _load

CT, MR = get_testdata_file('CT_small.dcm'), get_testdata_file('MR_small.dcm')

def test_no_fastai_import():
    for mod in ('fastdcm.core', 'fastdcm.pixels'):
        code = f"import {mod}, sys; bad = [m for m in sys.modules if m.split('.')[0] == 'fastai']; assert not bad, bad"
        subprocess.run([sys.executable, '-c', code], check=True)

@pytest.mark.parametrize('name', ['CT_small.dcm', 'MR_small.dcm', 'MR_small_implicit.dcm', 'rtdose.dcm',
                                  'rtdose_1frame.dcm', 'examples_overlay.dcm', 'image_dfl.dcm', 'examples_palette.dcm'])
@pytest.mark.parametrize('stage', ['stored', 'modality', 'display'])
def test_fast_path_agrees_with_pydicom_path(name, stage):
    f = get_testdata_file(name)
    ds = pydicom.dcmread(f)
    np.testing.assert_array_equal(dicom_pixels(f, stage), dicom_pixels(ds, stage))
    np.testing.assert_array_equal(dicom_pixels(f, stage), dicom_pixels(Path(f).read_bytes(), stage))

def test_frame_selection():
    f = get_testdata_file('rtdose.dcm')
    full = dicom_pixels(f)
    for i in (0, 7, 14): np.testing.assert_array_equal(dicom_pixels(f, frame=i), full[i])
    with pytest.raises(FrameIndexError, match='rtdose.dcm'): dicom_pixels(f, frame=15)

def test_voi_lut_function_numpy_and_torch_agree():
    import torch
    x = np.linspace(-1500, 1500, 301, dtype=np.float32)
    for fn in ('LINEAR', 'LINEAR_EXACT', 'SIGMOID'):
        for c, w in ((40, 400), (-600, 1500), (0.5, 1), (10, 2.5)):
            if fn != 'LINEAR' or w >= 1:
                y = voi_lut_function(x, c, w, fn)
                assert y.dtype == np.float32 and y.min() >= 0 and y.max() <= 1
                np.testing.assert_allclose(voi_lut_function(torch.from_numpy(x), c, w, fn).numpy(), y, atol=1e-6)
    # one window per channel, broadcast over a batch
    t = torch.from_numpy(x[:300].reshape(1, 1, 10, 30)).expand(2, 3, 10, 30)
    cs, ws = torch.tensor([-600., 40., 400.]).view(1, 3, 1, 1), torch.tensor([1500., 400., 1800.]).view(1, 3, 1, 1)
    out = voi_lut_function(t, cs, ws, ymin=-1, ymax=1)
    assert out.shape == (2, 3, 10, 30) and out.min() >= -1 and out.max() <= 1
    np.testing.assert_allclose(out[1, 2].numpy(), voi_lut_function(x[:300].reshape(10, 30), 400, 1800)*2 - 1, atol=1e-5)
    # integer input becomes float32
    assert voi_lut_function(np.arange(5), 2, 3).dtype == np.float32

def test_stage_and_window_arguments():
    with pytest.raises(ValueError, match='stage'): dicom_pixels(CT, 'hounsfield')
    f = get_testdata_file('examples_overlay.dcm')
    ds = pydicom.dcmread(f)
    assert [w[2] for w in header_windows(ds)] == ['WINDOW1', 'WINDOW2']
    np.testing.assert_array_equal(dicom_pixels(f, 'display', window='Window2'), dicom_pixels(f, 'display', window=1))
    mod = dicom_pixels(f)
    np.testing.assert_allclose(dicom_pixels(f, 'display', window=(200, 443, 'sigmoid')), voi_lut_function(mod, 200, 443, 'SIGMOID'), atol=1e-6)
    np.testing.assert_allclose(dicom_pixels(f, 'display', window=[200, 443]), voi_lut_function(mod, 200, 443), atol=1e-6)

def test_colour_display_in_unit_range():
    for n, shape in (('SC_rgb_rle_16bit.dcm', (100, 100, 3)), ('SC_rgb_rle_2frame.dcm', (2, 100, 100, 3)),
                     ('examples_ybr_color.dcm', (30, 240, 320, 3)), ('examples_palette.dcm', (350, 800, 3))):
        f = get_testdata_file(n)
        d = dicom_pixels(f, 'display')
        assert d.shape == shape and d.dtype == np.float32 and 0 <= d.min() and d.max() <= 1 and d.max() > 0.5, n
    # colour is RGB (pydicom converts YBR): a YBR_FULL JPEG shows the same picture as the lossless RGB original
    ref = dicom_pixels(get_testdata_file('SC_rgb_rle.dcm'), 'display')
    ybr = dicom_pixels(get_testdata_file('SC_rgb_dcmtk_+eb+cy+n1.dcm'), 'display')
    assert np.abs(ybr - ref).mean() < 0.03   # (left in YBR it would be ~0.36 away)
    assert dicom_pixels(get_testdata_file('SC_rgb_rle_2frame.dcm'), frame=1).shape == (100, 100, 3)

def test_n_frames():
    assert n_frames(pydicom.dcmread(CT)) == 1 and n_frames(pydicom.dcmread(get_testdata_file('rtdose.dcm'))) == 15
    ds = pydicom.Dataset(); ds.NumberOfFrames = 0
    assert n_frames(ds) == 1

from hypothesis import given, settings, strategies as st

@settings(max_examples=200, deadline=None)
@given(x=st.lists(st.floats(-5000, 5000, width=32), min_size=1, max_size=20),
       c=st.floats(-3000, 3000), w=st.floats(1, 6000), fn=st.sampled_from(['LINEAR', 'LINEAR_EXACT', 'SIGMOID']))
def test_voi_lut_function_matches_ps33_formulas(x, c, w, fn):
    "PS3.3 C.11.2.1.2 written out case by case, in float64, against the vectorised float32 implementation."
    x64 = np.array(x, np.float64)
    if fn == 'LINEAR':
        exp = np.array([0. if v <= c-0.5-(w-1)/2 else 1. if v > c-0.5+(w-1)/2 else (v-(c-0.5))/(w-1)+0.5 for v in x64])
    elif fn == 'LINEAR_EXACT':
        exp = np.array([0. if v <= c-w/2 else 1. if v > c+w/2 else (v-c)/w+0.5 for v in x64])
    else: exp = 1/(1+np.exp(np.clip(-4*(x64-c)/w, -700, 700)))
    got = voi_lut_function(np.array(x, np.float32), c, w, fn)
    # float32 inputs: allow the error of one ulp of x (~3e-4 at 5000) through the slope 1/w, or a step at a boundary
    tol = 1e-5 + 1e-3/max(w-1, 1e-3) if fn == 'LINEAR' else 1e-5 + 1e-3/w
    near_edge = np.zeros(len(x), bool)
    if fn != 'SIGMOID':
        lo, hi = (c-0.5-(w-1)/2, c-0.5+(w-1)/2) if fn == 'LINEAR' else (c-w/2, c+w/2)
        near_edge = (np.abs(x64-lo) < 1e-3) | (np.abs(x64-hi) < 1e-3)
    assert (np.abs(got - exp)[~near_edge] <= tol).all()
    assert got.min() >= 0 and got.max() <= 1

@pytest.mark.parametrize('name', ['CT_small.dcm', 'MR_small.dcm', 'MR_small_implicit.dcm', 'rtdose.dcm', 'MR_small_RLE.dcm',
                                  'SC_rgb_jpeg_dcmtk.dcm', 'image_dfl.dcm', 'examples_palette.dcm', 'MR_small_bigendian.dcm'])
@pytest.mark.parametrize('stage', ['stored', 'modality', 'display'])
def test_header_argument_gives_the_same_pixels(name, stage):
    "dicom_pixels(f, header=<f's stop_before_pixels Dataset>) == dicom_pixels(f), on fast-path and fall-back files alike."
    f = get_testdata_file(name)
    hdr = dcmread(f, stop_before_pixels=True)
    np.testing.assert_array_equal(dicom_pixels(f, stage, header=hdr), dicom_pixels(f, stage))

def test_header_argument_skips_the_second_parse(monkeypatch):
    "With a usable header the file's header is not parsed again; when pydicom no longer knows where it ends, it is."
    import fastdcm.pixels as px
    hdr = dcmread(CT, stop_before_pixels=True)
    ref = dicom_pixels(CT)
    def no_parse(*a, **k): raise AssertionError('header parsed again')
    monkeypatch.setattr(px, 'dcmread', no_parse)
    np.testing.assert_array_equal(dicom_pixels(CT, header=hdr), ref)
    np.testing.assert_array_equal(dicom_pixels(CT, header=hdr), ref)          # the header is left usable
    hdr[next(reversed(hdr.keys()))]                                              # converting the last element: offset unknown
    assert px._header_end(hdr) is None
    with pytest.raises(PixelDecodeError, match='parsed again'): dicom_pixels(CT, header=hdr)   # (wrapped, as any failure)
    monkeypatch.undo()
    np.testing.assert_array_equal(dicom_pixels(CT, header=hdr), ref)          # ... so the file is read as usual

def test_header_argument_refuses_another_files_header(tmp_path):
    with pytest.raises(ValueError, match='not from'): dicom_pixels(MR, header=dcmread(CT, stop_before_pixels=True))
    with pytest.raises(TypeError, match='Dataset'): dicom_pixels(CT, header={'Rows': 128})
    cut = tmp_path/'cut.dcm'; cut.write_bytes(Path(CT).read_bytes()[:-1000])
    with pytest.raises(TruncatedDicomError, match='cut.dcm'): dicom_pixels(cut, header=dcmread(cut, stop_before_pixels=True))

@pytest.mark.parametrize('name', ['CT_small.dcm', 'MR_small.dcm', 'rtdose.dcm', 'MR_small_RLE.dcm', 'SC_rgb_jpeg_dcmtk.dcm',
                                  'examples_palette.dcm', 'MR_small_bigendian.dcm', 'image_dfl.dcm'])
@pytest.mark.parametrize('stage', ['stored', 'modality', 'display'])
def test_out_argument_writes_in_place(name, stage):
    "dicom_pixels(f, out=a) fills `a` with exactly dicom_pixels(f) and returns it (modality stage: computed in `a` itself)."
    f = get_testdata_file(name)
    ref = dicom_pixels(f, stage)
    out = np.full(ref.shape, np.nan, np.float32)
    assert dicom_pixels(f, stage, out=out) is out
    np.testing.assert_array_equal(out, ref)
    view = np.full((2, *ref.shape), np.nan, np.float32)                       # a slot of a bigger array, like a volume's
    dicom_pixels(f, stage, out=view[1]); np.testing.assert_array_equal(view[1], ref); assert np.isnan(view[0]).all()

def test_out_argument_is_checked():
    with pytest.raises(PixelDecodeError, match=r'CT_small.dcm.*\(128, 128\).*\(64, 128\)'):
        dicom_pixels(CT, out=np.zeros((64, 128), np.float32))
    with pytest.raises(PixelDecodeError, match='CT_small.dcm'): dicom_pixels(CT, 'display', out=np.zeros((64, 128), np.float32))
    with pytest.raises(TypeError, match='float32'): dicom_pixels(CT, out=np.zeros((128, 128), np.float64))
    with pytest.raises(TypeError, match='float32'): dicom_pixels(CT, out=[[0.]*128]*128)

def _raw_values_of(f):
    "Every raw-read keyword of the pipeline in file `f`: (what `_get` reads from the raw bytes, pydicom's conversion)."
    from fastdcm.pixels import _get, _RAW_KINDS
    raw, conv = dcmread(f, stop_before_pixels=True), pydicom.dcmread(f, stop_before_pixels=True)
    return [(kw, _get(raw, kw), conv.get(kw)) for kw in _RAW_KINDS if kw in conv]

def test_raw_header_values_match_pydicom():
    "The raw reader of hot header values agrees with pydicom's own conversion on every pydicom test file that has them."
    from pydicom.data import get_testdata_files
    checked = set()
    for f in get_testdata_files('*.dcm'):
        try: pairs = _raw_values_of(f)
        except Exception: continue            # files pydicom itself can't read (deliberately broken test data)
        for kw, got, exp in pairs:
            if exp is None or exp == '': continue
            exp_t = tuple(exp) if isinstance(exp, pydicom.multival.MultiValue) else exp
            if isinstance(got, tuple) and not isinstance(exp_t, tuple): exp_t = (exp_t,)   # one value of a multi-valued kw
            if isinstance(got, tuple):
                assert len(got) == len(exp_t) and all((float(a) == float(b)) if not isinstance(a, str) else a == str(b).strip()
                                                      for a, b in zip(got, exp_t)), (f, kw, got, exp)
            elif isinstance(got, str): assert got == str(exp).strip(), (f, kw, got, exp)
            elif kw.startswith('PixelPadding'): assert got == int(exp) % 2**16, (f, kw, got, exp)   # US or SS: read as US, signed later
            else: assert float(got) == float(exp), (f, kw, got, exp)
            checked.add(kw)
    # the geometry and code keywords were all met somewhere
    assert {'ImagePositionPatient', 'ImageOrientationPatient', 'PixelSpacing', 'SliceThickness', 'InstanceNumber',
            'ImageType', 'Modality', 'SeriesInstanceUID', 'RescaleSlope', 'Rows'} <= checked, checked
