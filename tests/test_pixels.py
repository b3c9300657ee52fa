"Tests for fastdcm.pixels beyond the notebook: import hygiene, fast path vs pydicom path, bad input, enhanced multi-frame."
import struct, subprocess, sys
from pathlib import Path
import numpy as np, pytest, pydicom
from pydicom.data import get_testdata_file
from fastdcm.core import *
from fastdcm.pixels import *
from fastdcm.pixels import PixelDecodeError, FrameIndexError, _load
from conftest import installed_test_files   # and the `no_downloads` fixture

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

def test_raw_header_values_match_pydicom(no_downloads):
    "The raw reader of hot header values agrees with pydicom's own conversion on every installed pydicom test file that has them."
    checked = set()
    files = installed_test_files()
    assert len(files) >= 60
    for f in files:
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

# ---------------------------------------------------------------------------------------------------------------
# Issue 8: files without preamble or file meta (item 2), pixel edge cases (item 3), headers that lie (item 4)
import tracemalloc
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from fastdcm.synth import synth_bad_files

def _meta_less(src, dst, implicit):
    "`src` rewritten without preamble, `DICM` or file meta (a raw dataset, PS3.5 A.1 / A.2)."
    ds = pydicom.dcmread(src)
    del ds.file_meta
    ds.preamble = None
    ds.save_as(dst, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    return dst

@pytest.mark.parametrize('implicit', [True, False])
def test_files_without_preamble_or_meta_decode(tmp_path, implicit):
    f = _meta_less(CT, tmp_path/'IM000001', implicit)             # no extension either, as PACS exports write them
    b = f.read_bytes()
    assert b[:2] == b'\x08\x00' and b[128:132] != b'DICM'
    assert get_dicom_files(tmp_path) == [f]
    ds = dcmread(f)                                               # no force needed: a dataset starts at byte 0
    assert ds.file_meta.TransferSyntaxUID == ('1.2.840.10008.1.2' if implicit else '1.2.840.10008.1.2.1')
    for stage in ('stored', 'modality', 'display'):
        ref = dicom_pixels(CT, stage)
        np.testing.assert_array_equal(dicom_pixels(f, stage), ref)
        np.testing.assert_array_equal(dicom_pixels(b, stage), ref)
    # a Dataset read elsewhere without any file meta: decoded in the encoding pydicom read it in, and left as it was
    raw = pydicom.dcmread(f, force=True)
    assert 'TransferSyntaxUID' not in raw.file_meta
    np.testing.assert_array_equal(dicom_pixels(raw), dicom_pixels(CT))
    assert 'TransferSyntaxUID' not in raw.file_meta

def test_synth_no_preamble_and_pydicom_meta_less_files(tmp_path):
    f = synth_bad_files(tmp_path)['no_preamble']
    ds = pydicom.dcmread(f, force=True); ds.file_meta.TransferSyntaxUID = '1.2.840.10008.1.2'   # what PS3.5 A.1 says it is
    np.testing.assert_array_equal(dicom_pixels(f, 'stored'), ds.pixel_array)
    np.testing.assert_allclose(dicom_pixels(f), pydicom.pixels.apply_modality_lut(ds.pixel_array, ds), atol=1e-3)
    for name in ('ExplVR_LitEndNoMeta.dcm', 'ExplVR_BigEndNoMeta.dcm'):   # RT plans (no pixels), explicit VR LE / BE
        g = tmp_path/name.replace('.dcm', ''); g.write_bytes(Path(get_testdata_file(name)).read_bytes())
        assert is_dicom(g) and dcmread(g).Modality == 'RTPLAN'

def test_palette_8bit_descriptor_in_16bit_words(tmp_path):
    "PS3.3 C.7.6.3.1.5: the descriptor's third value is the bits per entry; 8-bit entries stored in 16-bit words scale by 255, not 65535."
    src = get_testdata_file('examples_palette.dcm')
    ds = pydicom.dcmread(src)
    tables = []
    for c in ('Red', 'Green', 'Blue'):
        d = getattr(ds, f'{c}PaletteColorLookupTableDescriptor')
        data = np.frombuffer(getattr(ds, f'{c}PaletteColorLookupTableData'), '<u2') >> 8
        setattr(ds, f'{c}PaletteColorLookupTableDescriptor', [d[0], d[1], 8])
        setattr(ds, f'{c}PaletteColorLookupTableData', data.astype('<u2').tobytes())
        tables.append(data)
    f = tmp_path/'pal8.dcm'; ds.save_as(f)
    got = dicom_pixels(f, 'display')
    stored = pydicom.dcmread(src).pixel_array
    np.testing.assert_allclose(got, np.stack([t[stored] for t in tables], -1) / 255., atol=1e-6)
    np.testing.assert_allclose(got, dicom_pixels(src, 'display'), atol=1/255)        # the same picture as the 16-bit palette

def _mono(fn, stored, implicit=False, **attrs):
    "A minimal MONOCHROME2 file from `stored` (uint16), with `attrs` (keyword -> value, or (VR, value))."
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = '1.2.840.10008.5.1.4.1.1.7', generate_uid()
    meta.TransferSyntaxUID = '1.2.840.10008.1.2' if implicit else ExplicitVRLittleEndian
    ds = Dataset(); ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = 'CT', 1, 'MONOCHROME2'
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for k, v in attrs.items(): setattr(ds, k, v)
    ds.PixelData = stored.astype('<u2').tobytes()
    ds.save_as(fn, enforce_file_format=True, implicit_vr=implicit)
    return fn

def _voi_item(desc, data=None, vr='SS', data_bytes=None):
    item = Dataset()
    if desc is not None: item.add_new('LUTDescriptor', vr, desc)
    if data_bytes is not None: item.add_new('LUTData', 'OW', data_bytes)
    elif data is not None: item.add_new('LUTData', 'US', [int(v) for v in data])
    return item

@pytest.mark.parametrize('implicit', [False, True])
def test_voi_lut_negative_first_mapped_value(tmp_path, implicit):
    "The VOI LUT's input is the Modality LUT's output (PS3.3 C.11.2.1.1): a first mapped value of -24 on unsigned stored data with intercept -1024 is -24 HU, whether the descriptor was read as SS or (implicit VR, unsigned data) as US 65512."
    stored = np.arange(900, 1300, dtype=np.uint16).reshape(20, 20)      # -124 .. 275 HU
    table = np.linspace(0, 65535, 256).round()
    f = _mono(tmp_path/'voi.dcm', stored, implicit, RescaleSlope=1, RescaleIntercept=-1024,
              VOILUTSequence=[_voi_item([256, -24, 16], table)])
    got = dicom_pixels(f, 'display')
    hu = stored.astype(np.float64) - 1024
    np.testing.assert_allclose(got, table[np.clip(hu + 24, 0, 255).astype(int)] / 65535, atol=1e-6)
    assert got.min() == 0 and got.max() == 1 and 0 < np.median(got) < 1

def test_voi_lut_item_without_table_is_no_voi(tmp_path):
    "A VOI LUT Sequence item with no LUT Descriptor or LUT Data (and no window): no VOI, as pydicom does -- the display is the plain range."
    stored = np.arange(400, dtype=np.uint16).reshape(20, 20)
    ref = dicom_pixels(_mono(tmp_path/'plain.dcm', stored), 'display')
    item = Dataset(); item.LUTExplanation = 'EMPTY'
    got = dicom_pixels(_mono(tmp_path/'empty_voi.dcm', stored, VOILUTSequence=[item]), 'display')
    np.testing.assert_array_equal(got, ref)

def test_voi_lut_8bit_odd_number_of_entries(tmp_path):
    "8 bits per entry with an odd entry count: LUT Data bytes are padded to even length; 8 or 16 bits comes from the descriptor."
    table = np.linspace(0, 255, 255).round().astype(np.uint8)           # 255 entries -> 256 bytes with the pad
    stored = np.arange(400, dtype=np.uint16).reshape(20, 20)
    f = _mono(tmp_path/'voi8.dcm', stored, VOILUTSequence=[_voi_item([255, 100, 8], vr='US', data_bytes=table.tobytes() + b'\0')])
    got = dicom_pixels(f, 'display')
    assert got.max() <= 1
    np.testing.assert_allclose(got, table[np.clip(stored.astype(int) - 100, 0, 254)] / 255., atol=1e-6)

def test_ybr_full_16bit_to_rgb(tmp_path):
    "16-bit YBR_FULL (pydicom 3.0.2 converts 8-bit only) becomes RGB by the inverse of PS3.3 C.7.6.3.1.2's equations."
    rng = np.random.default_rng(0)
    rgb = rng.integers(2000, 63000, (6, 7, 3)).astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    ybr = np.stack([.2990*r + .5870*g + .1140*b, -.1687*r - .3313*g + .5000*b + 32768, .5000*r - .4187*g - .0813*b + 32768], -1)
    meta = FileMetaDataset(); meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = '1.2.840.10008.5.1.4.1.1.7', generate_uid()
    ds = Dataset(); ds.file_meta = meta; ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 6, 7, 3, 'YBR_FULL', 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.rint(ybr).astype('<u2').tobytes()
    f = tmp_path/'ybr16.dcm'; ds.save_as(f, enforce_file_format=True)
    np.testing.assert_allclose(dicom_pixels(f, 'stored'), rgb, atol=2)                 # within rounding of the YBR samples
    np.testing.assert_allclose(dicom_pixels(f, 'display'), rgb / 65535, atol=3/65535)
    # the same conversion as pydicom's on 8-bit data
    y8 = np.rint(ybr / 257).clip(0, 255).astype(np.uint8)
    np.testing.assert_allclose(ybr_full_to_rgb(y8, 8).astype(int),
                               pydicom.pixels.convert_color_space(y8, 'YBR_FULL', 'RGB').astype(int), atol=1)

def _peak_alloc(f, *a, **k):
    "(result or exception, peak bytes allocated while `f` ran)."
    tracemalloc.start()
    try:
        try: res = f(*a, **k)
        except Exception as e: res = e
        return res, tracemalloc.get_traced_memory()[1]
    finally: tracemalloc.stop()

def _edited(tmp_path, src, name, **attrs):
    ds = pydicom.dcmread(src)
    for k, v in attrs.items(): setattr(ds, k, v)
    fn = tmp_path/name; ds.save_as(fn)
    return fn

@pytest.mark.parametrize('src,attrs,sizes', [
    ('CT_small.dcm', dict(Rows=64), ('32768', '16384')),                 # today: half the image
    ('SC_rgb.dcm', dict(Columns=3), ('30000', '900')),                   # today: 33 invented frames
    ('MR_small_padded.dcm', {}, ('8320', '8192')),                        # 128 bytes beyond the geometry
    ('CT_small.dcm', dict(NumberOfFrames='99999999999'), ('32768', '3276799999967232')),
    ('MR_small_RLE.dcm', dict(NumberOfFrames='99999999'), ('99999999', '1 fragment')),
    ('MR_small_RLE.dcm', dict(Rows=60000, Columns=60000), ('7200000000', '6128'))])
def test_headers_that_lie_about_geometry(tmp_path, src, attrs, sizes):
    "Pixel Data longer than the geometry (beyond one pad byte), absurd frame counts and geometry: a PixelDataLengthError naming both sizes, before allocating."
    f = _edited(tmp_path, get_testdata_file(src), 'lie.dcm', **attrs)
    for stage, inp in (('stored', f), ('modality', f), ('display', f), ('modality', f.read_bytes()), ('modality', dcmread(f))):
        err, peak = _peak_alloc(dicom_pixels, inp, stage)
        assert isinstance(err, PixelDataLengthError) and ('lie.dcm' in str(err) or 'bytes>' in str(err)), err
        assert all(s in str(err) for s in sizes), str(err)
        assert peak < 20 * f.stat().st_size, peak

def test_lying_element_lengths_allocate_nothing(tmp_path):
    "An element whose length runs past the end of the file is refused by comparing with the bytes in the file: nothing near its size is allocated."
    b = bytearray(Path(CT).read_bytes())
    pix = b.rfind(b'\xe0\x7f\x10\x00OW')
    lie = bytearray(b); lie[pix+8:pix+12] = struct.pack('<I', 0xFFFFFFF0)
    f = tmp_path/'pixlen.dcm'; f.write_bytes(bytes(lie))
    for call in (lambda: dicom_pixels(f), lambda: dcmread(f), lambda: dicom_pixels(f, frame=0)):
        err, peak = _peak_alloc(call)
        assert isinstance(err, TruncatedDicomError) and 'pixlen.dcm' in str(err) and '4294967280' in str(err), err
        assert peak < 20 * len(b), peak
    # a header element (private OB) that claims 4 GB
    raw = dcmread(CT, stop_before_pixels=True).get_item(0x00431028, keep_deferred=True)
    lie = bytearray(b); lie[raw.value_tell-4:raw.value_tell] = struct.pack('<I', 0xFFFFFFF0)
    g = tmp_path/'oblen.dcm'; g.write_bytes(bytes(lie))
    for call in (lambda: dicom_pixels(g), lambda: dcmread(g, stop_before_pixels=True)):
        err, peak = _peak_alloc(call)
        assert isinstance(err, TruncatedDicomError) and 'oblen.dcm' in str(err), err
        assert peak < 20 * len(b), peak

def test_pydicom_data_palette_without_meta(tmp_path):
    "OT-PAL-8-face.dcm (pydicom-data, a dev dependency): no preamble, no file meta, a palette -- found without extension, decoded as implicit VR little endian."
    f = get_testdata_file('OT-PAL-8-face.dcm', download=False)
    if f is None: pytest.skip('pydicom-data is not installed (pip install pydicom-data)')
    g = tmp_path/'FACE'; g.write_bytes(Path(f).read_bytes())
    assert get_dicom_files(tmp_path) == [g]
    ds = pydicom.dcmread(f, force=True); ds.file_meta.TransferSyntaxUID = '1.2.840.10008.1.2'
    np.testing.assert_array_equal(dicom_pixels(g, 'stored'), ds.pixel_array)
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    np.testing.assert_allclose(dicom_pixels(g, 'display'), pydicom.pixels.apply_color_lut(ds.pixel_array, ds) / (2**bits - 1), atol=1e-6)

@pytest.mark.parametrize('src,geo', [('SC_rgb_jpeg_dcmtk.dcm', '100 x 100'), ('JPEG2000.dcm', '1024 x 256'),
                                     ('JPEG-LL.dcm', '1024 x 256'), ('JPEGLSNearLossless_16.dcm', '50 x 10')])
def test_compressed_geometry_lies_refused_by_the_stream(tmp_path, src, geo):
    "JPEG 2000 codes a 1024 x 256 frame in 266 bytes, so no ratio bounds a compressed frame: the stream's own header does. Today a 30000 x 30000 header allocates 1.7-2.5 GB first."
    f = _edited(tmp_path, get_testdata_file(src), 'big.dcm', Rows=30000, Columns=30000)
    err, peak = _peak_alloc(dicom_pixels, f)
    assert isinstance(err, PixelDecodeError) and 'big.dcm' in str(err) and '30000 x 30000' in str(err) and geo in str(err), err
    assert peak < 20 * f.stat().st_size + 2**20, peak
    np.testing.assert_array_equal(dicom_pixels(get_testdata_file(src), 'stored'), pydicom.dcmread(get_testdata_file(src)).pixel_array)

# ---------------------------------------------------------------------------------------------------------------
# JPEG-LS through CharLS (pyjpegls, the `fast` extra) when installed: the same values as pydicom's default plugin

def _jpeg_ls_files():
    import pydicom.uid as U
    out = []
    for f in installed_test_files():
        try: ts = pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID
        except Exception: continue
        if ts in (U.JPEGLSLossless, U.JPEGLSNearLossless): out.append(f)
    return out

def test_jpeg_ls_through_charls_equals_pydicom(monkeypatch, no_downloads):
    "Every installed JPEG-LS test file (lossless and near-lossless, all frames and single frames, every stage) gives the same pixels, or the same typed error, through CharLS (pyjpegls) as through pydicom's first choice, pylibjpeg-libjpeg."
    pytest.importorskip('jpeg_ls', reason='pyjpegls is not installed (pip install fastdcm[fast]): pydicom decodes JPEG-LS with its default plugin')
    import fastdcm.pixels as px
    files = _jpeg_ls_files()
    assert len(files) >= 4, files
    orig, decoded = px._decode_fast, []
    def charls(*a):
        arr = orig(*a); decoded.append(arr is not None); return arr
    def outcome(f, **k):
        try: return dicom_pixels(f, **k)
        except Exception as e: return e
    for f in files:
        nf = int(pydicom.dcmread(f, stop_before_pixels=True).get('NumberOfFrames') or 1)
        ks = [dict(stage=s) for s in ('stored', 'modality', 'display')] + [dict(frame=i) for i in sorted({0, nf - 1})]
        monkeypatch.setattr(px, '_decode_fast', charls); decoded.clear()
        fast = [outcome(f, **k) for k in ks]
        assert any(decoded), f   # CharLS decoded it
        monkeypatch.setattr(px, '_decode_fast', lambda *a: None)   # pydicom's default plugin
        ref = [outcome(f, **k) for k in ks]
        for k, a, b in zip(ks, fast, ref):
            if isinstance(b, Exception): assert type(a) is type(b) and str(a) == str(b), (f, k, a, b)
            else: assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), (f, k)

# ---------------------------------------------------------------------------------------------------------------
# JPEG 2000 / HTJ2K through imagecodecs (the `fast` extra) on several threads: the same outcome as pydicom's plugins

_J2K_UIDS = ('1.2.840.10008.1.2.4.90', '1.2.840.10008.1.2.4.91', '1.2.840.10008.1.2.4.201', '1.2.840.10008.1.2.4.202', '1.2.840.10008.1.2.4.203')

def _j2k_files():
    out = []
    for f in installed_test_files():
        try: ts = pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID
        except Exception: continue
        if ts in _J2K_UIDS: out.append(f)
    return out

def _outcome(f, **k):
    try: return dicom_pixels(f, **k)
    except Exception as e: return e

def _same_outcome(a, b, what):
    import re
    if isinstance(a, Exception) or isinstance(b, Exception):
        at = lambda e: re.sub(r' at 0x[0-9a-f]+', '', str(e))   # pillow names the address of its BytesIO
        assert type(a) is type(b) and at(a) == at(b), (what, a, b)
    else: assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True), what

@pytest.fixture
def threads_seen(monkeypatch):
    "The `numthreads` of every imagecodecs JPEG 2000 decode, with two threads asked for."
    ic = pytest.importorskip('imagecodecs', reason='imagecodecs is not installed (pip install fastdcm[fast]): pydicom decodes JPEG 2000 with its own plugins')
    from fastdcm import backend
    seen, orig = [], ic.jpeg2k_decode
    def spy(src, **k): seen.append(k.get('numthreads')); return orig(src, **k)
    monkeypatch.setattr(backend._imagecodecs, 'jpeg2k_decode', spy)
    monkeypatch.setenv('FASTDCM_DECODE_THREADS', '2')
    return seen

def test_jpeg_2000_through_imagecodecs_equals_pydicom(monkeypatch, threads_seen, no_downloads):
    "Every installed JPEG 2000 test file (signed, 10-16 bits, MONOCHROME1, RGB, YBR_ICT/RCT, multi-frame, a precision that disagrees with the header), every stage, all frames and single frames: the same pixels, or the same typed error, decoded by imagecodecs on two threads as by pydicom's own plugins."
    import fastdcm.pixels as px
    files = _j2k_files()
    assert len(files) >= 15, files
    orig, decoded = px._decode_fast, 0
    for f in files:
        nf = int(pydicom.dcmread(f, stop_before_pixels=True).get('NumberOfFrames') or 1)
        ks = [dict(stage=s) for s in ('stored', 'modality', 'display')] + [dict(frame=i) for i in sorted({0, nf - 1})]
        monkeypatch.setattr(px, '_decode_fast', lambda *a: None)   # pydicom's plugins (pylibjpeg-openjpeg first)
        ref = [_outcome(f, **k) for k in ks]
        monkeypatch.setattr(px, '_decode_fast', orig); threads_seen.clear()
        fast = [_outcome(f, **k) for k in ks]
        for k, a, b in zip(ks, fast, ref): _same_outcome(a, b, (f, k))
        # imagecodecs decoded every file pydicom decodes (the others are refused before any decoder, or by both)
        if any(not isinstance(r, Exception) for r in ref): assert set(threads_seen) == {2}, (f, threads_seen)
        decoded += any(not isinstance(r, Exception) for r in ref)
    assert decoded >= 15, decoded

def test_jpeg_2000_mutants_same_outcome(tmp_path, monkeypatch, threads_seen):
    "JPEG 2000 files with one to eight bytes of Pixel Data changed, some cut short: never a crash (an abort would end the test run), and the same pixels or the same typed error as through pydicom's own plugins."
    import random, fastdcm.pixels as px
    rng, orig, n = random.Random(0), px._decode_fast, 0
    for name in ('JPEG2000.dcm', 'MR_small_jp2klossless.dcm', 'US1_J2KR.dcm', 'emri_small_jpeg_2k_lossless.dcm'):
        src = get_testdata_file(name)
        if src is None: continue
        data = Path(src).read_bytes(); start = len(data) - len(pydicom.dcmread(src).PixelData)
        for i in range(40):
            b = bytearray(data)
            for _ in range(rng.randint(1, 8)): b[rng.randrange(start, len(b))] = rng.randrange(256)
            if rng.random() < 0.2: b = b[:rng.randrange(start, len(b))]
            f = tmp_path/f'{i}_{name}'; f.write_bytes(bytes(b))
            monkeypatch.setattr(px, '_decode_fast', orig); fast = _outcome(f, stage='stored')
            monkeypatch.setattr(px, '_decode_fast', lambda *a: None); ref = _outcome(f, stage='stored')
            _same_outcome(fast, ref, f.name); n += 1
    assert n >= 80 and len(threads_seen) >= n // 2, (n, len(threads_seen))

def _encapsulated_files(uids):
    out = []
    for f in installed_test_files():
        try: ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception: continue
        if ds.file_meta.get('TransferSyntaxUID') in uids: out.append(f)
    return out

def test_stream_geometry_reads_the_frame_header_as_libjpeg_does(no_downloads):
    "For every installed JPEG and JPEG-LS test file, the rows and columns `_stream_geometry` reads from the first frame's header (pydicom's SOF reader) are what libjpeg's parser reports, which reads the whole stream."
    import libjpeg
    from pydicom.encaps import generate_frames
    from fastdcm.pixels import _stream_geometry, _JPEG_TS
    files = _encapsulated_files(_JPEG_TS)
    assert len(files) >= 10
    compared = 0
    for f in files:
        ds = pydicom.dcmread(f)
        if 'PixelData' not in ds: continue
        frame = next(generate_frames(ds.PixelData, number_of_frames=int(ds.get('NumberOfFrames') or 1)))
        try: p = libjpeg.get_parameters(frame)
        except Exception: continue   # libjpeg can't parse it: the check is skipped either way
        assert _stream_geometry(frame, ds.file_meta.TransferSyntaxUID) == (p['rows'], p['columns']), f
        compared += 1
    assert compared >= 10

@pytest.mark.parametrize('name', ['MR_small_jpeg_ls_lossless.dcm', 'JPEG2000.dcm', 'SC_rgb_jpeg_dcmtk.dcm'])
def test_header_larger_than_the_stream_refused(tmp_path, name):
    "A header claiming more rows than the first frame's JPEG-LS / JPEG 2000 / JPEG stream holds is refused before any decoder allocates for it."
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.Rows = ds.Rows * 4
    ds.save_as(tmp_path/'big.dcm')
    with pytest.raises(PixelDecodeError, match='stream holds'): dicom_pixels(tmp_path/'big.dcm')
