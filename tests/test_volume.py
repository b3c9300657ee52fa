"Acceptance tests for fastdcm.volume: series validation, ordering, geometry, resampling, 2.5-D stacks."
import math, warnings
from pathlib import Path
import numpy as np, pytest, torch, pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage
from fastdcm.core import DicomError, get_dicom_files
from fastdcm.pixels import dicom_pixels
from fastdcm.synth import synth_ct_series
from fastdcm.volume import *

def _oblique(deg_x=20., deg_z=15.):
    "An oblique orientation: axial rotated about x then z (row and column cosines, orthonormal)."
    ax, az = math.radians(deg_x), math.radians(deg_z)
    rx = np.array([[1,0,0],[0,math.cos(ax),-math.sin(ax)],[0,math.sin(ax),math.cos(ax)]])
    rz = np.array([[math.cos(az),-math.sin(az),0],[math.sin(az),math.cos(az),0],[0,0,1]])
    m = rz @ rx
    return tuple(float(v) for v in np.concatenate([m[:,0], m[:,1]]))

def _ipp(f): return np.array(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient, dtype=float)

def _hu(f):
    "Modality values computed independently of fastdcm.pixels: stored * slope + intercept (padding excluded)."
    ds = pydicom.dcmread(f)
    px = ds.pixel_array
    hu = px.astype(np.float64)*float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    pad = ds.get('PixelPaddingValue')
    return hu, (px!=pad) if pad is not None else np.ones(px.shape, bool)

@pytest.fixture(scope='module')
def oblique(tmp_path_factory):
    path = tmp_path_factory.mktemp('oblique')
    iop = _oblique()
    truth = synth_ct_series(path, n_slices=20, size=48, slice_spacing=0.625, pixel_spacing=(0.7, 0.8), orientation=iop,
                            shuffle=True, extensionless=True, bad_instance_numbers=True, per_slice_slope=True, seed=3)
    return path, truth, iop

def test_oblique_series_loads_in_position_order(oblique):
    path, truth, iop = oblique
    files = get_dicom_files(path)
    assert all(f.suffix=='' for f in files), 'synth should write extensionless names'
    assert [f.name for f in files] != [f.name for f in truth], 'names should not follow the anatomy'
    inst = [int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) for f in truth]
    assert inst != sorted(inst), 'InstanceNumbers should disagree with positions'
    vol = load_series(path)
    assert vol.shape == (20, 48, 48)
    assert [Path(f) for f in vol.meta['fnames']] == [Path(f) for f in truth]
    for k,f in enumerate(truth):
        hu, real = _hu(f)
        np.testing.assert_array_equal(vol.array[k], dicom_pixels(f))
        np.testing.assert_allclose(vol.array[k][real], hu[real], rtol=0, atol=1e-3)
        if (~real).any(): assert vol.array[k][~real].max() <= hu[real].min()
    np.testing.assert_allclose(vol.spacing, (0.625, 0.7, 0.8), atol=1e-4)
    row, col = np.array(iop[:3]), np.array(iop[3:])
    np.testing.assert_allclose(vol.direction, np.stack([np.cross(row, col), col, row], 1), atol=1e-5)
    # the affine puts every voxel (k, 0, 0) at its slice's Image Position, and (k, j, i) along the cosines
    for k in (0, 7, 19): np.testing.assert_allclose(vol.lps([k, 0, 0]), _ipp(truth[k]), atol=1e-3)
    np.testing.assert_allclose(vol.lps([0, 2, 3]), _ipp(truth[0]) + 2*0.7*col + 3*0.8*row, atol=1e-4)
    np.testing.assert_allclose(vol.affine[:3, 3], _ipp(truth[0]), atol=1e-4)

def test_per_slice_slopes_differ(oblique):
    "The fixture must exercise per-slice rescale, or the exact-HU test proves little."
    _, truth, _ = oblique
    slopes = {float(pydicom.dcmread(f, stop_before_pixels=True).RescaleSlope) for f in truth}
    assert len(slopes) > 1

def test_find_series_row(oblique):
    path, truth, _ = oblique
    df = find_series(path, progress=False)
    assert len(df) == 1
    r = df.iloc[0]
    assert r.n_files == 20 and r.n_frames == 20 and r.problems == ''
    assert r.orientation == 'oblique'
    assert abs(r.slice_spacing - 0.625) < 1e-4 and np.allclose(r.pixel_spacing, (0.7, 0.8))
    assert r.Modality == 'CT' and r.PatientID

def test_missing_slice_names_gap(tmp_path):
    truth = synth_ct_series(tmp_path, n_slices=16, size=32, slice_spacing=1.25, drop=[6], seed=1)
    with pytest.raises(SeriesError, match=r'missing slice\(s\): gap of 2\.500 mm') as e:
        load_series(tmp_path)
    uid = pydicom.dcmread(truth[0], stop_before_pixels=True).SeriesInstanceUID
    assert uid in str(e.value) and isinstance(e.value, DicomError)
    # the two files around the gap are named
    around = [Path(f).name for f in truth if Path(f).exists()]
    assert any(n in str(e.value) for n in around)
    with pytest.warns(UserWarning, match='missing slice'):
        assert load_series(tmp_path, strict=False).shape[0] == 15
    assert 'missing slice' in find_series(tmp_path, progress=False).problems.item()

def test_tilt_detected(tmp_path):
    truth = synth_ct_series(tmp_path, n_slices=16, size=32, slice_spacing=1., tilt_deg=12., seed=2)
    with pytest.raises(SeriesError, match='gantry tilt of 1[12]'): load_series(tmp_path)
    r = find_series(tmp_path, progress=False).iloc[0]
    assert abs(r.tilt_deg - 12) < 0.5, r.tilt_deg
    # 'keep': the affine follows the real slice positions
    kept = load_series(tmp_path, tilt='keep')
    for k in (0, 8, 15): np.testing.assert_allclose(kept.lps([k, 0, 0]), _ipp(truth[k]), atol=1e-3)
    # 'resample': on a regular grid, each slice's own pixel (0,0) lands where the grid says it is
    reg = load_series(tmp_path, tilt='resample')
    assert reg.shape == kept.shape
    np.testing.assert_allclose(reg.direction[:, 0], np.cross(reg.direction[:, 2], reg.direction[:, 1]), atol=1e-6)
    k = 10
    off = _ipp(truth[k]) - reg.lps([k, 0, 0])            # in-plane offset of slice k from the regular grid
    dj, di = off @ reg.direction[:, 1] / reg.spacing[1], off @ reg.direction[:, 2] / reg.spacing[2]
    assert abs(off @ reg.direction[:, 0]) < 1e-3
    j, i = int(np.ceil(dj)) + 3, int(np.ceil(di)) + 3     # a pixel inside both grids
    expected = ndimage.map_coordinates(kept.array[k], [[j - dj], [i - di]], order=1)[0]
    assert abs(reg.array[k, j, i] - expected) < 1e-2 * max(1., abs(expected))

def test_untilted_has_no_tilt(oblique):
    path, _, _ = oblique
    assert find_series(path, progress=False).tilt_deg.item() == 0

def test_two_series_reported_not_merged(tmp_path):
    a = synth_ct_series(tmp_path/'a', n_slices=8, size=32, seed=4)
    b = synth_ct_series(tmp_path/'b', n_slices=6, size=32, seed=5)
    # put all files side by side in one folder, as PACS exports do
    flat = tmp_path/'flat'; flat.mkdir()
    for i,f in enumerate(a+b): Path(f).rename(flat/f'IM{i:05d}')
    uids = {pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in get_dicom_files(flat)}
    assert len(uids) == 2
    with pytest.raises(SeriesError, match='several series') as e: load_series(flat)
    for u in uids: assert u in str(e.value)
    df = find_series(flat, progress=False)
    assert sorted(df.n_files) == [6, 8] and (df.problems == '').all()
    vols = list(iter_series(flat, progress=False))
    assert sorted(v.shape[0] for v in vols) == [6, 8]
    for (_,row) in df.iterrows(): assert load_series(row).shape[0] == row.n_files

def test_duplicate_slice_refused(tmp_path):
    synth_ct_series(tmp_path, n_slices=10, size=32, duplicate=[4], seed=6)
    assert len(get_dicom_files(tmp_path)) == 11
    with pytest.raises(SeriesError, match='duplicate position'): load_series(tmp_path)

def test_too_few_and_bad_tilt_arg(tmp_path):
    truth = synth_ct_series(tmp_path, n_slices=2, size=32, bad_instance_numbers=False, seed=7)
    with pytest.raises(SeriesError, match='only 2 slice'): load_series(tmp_path)
    assert load_series(tmp_path, min_slices=2).shape[0] == 2
    with pytest.raises(ValueError, match='tilt'): load_series(tmp_path, tilt='maybe')

def test_inconsistent_shape_and_orientation(tmp_path):
    truth = synth_ct_series(tmp_path, n_slices=6, size=32, seed=8)
    ds = pydicom.dcmread(truth[2]); ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]; ds.save_as(truth[2])
    with pytest.raises(SeriesError, match='inconsistent orientation'): load_series(tmp_path)

@pytest.mark.parametrize('image_type', [['ORIGINAL', 'PRIMARY', 'LOCALIZER'], 'LOCALIZER'])
def test_localizer_left_out(tmp_path, image_type):
    truth = synth_ct_series(tmp_path, n_slices=6, size=32, seed=9)
    ds = pydicom.dcmread(truth[0]); ds.ImageType = image_type          # (one value: a str, not a list, in pydicom)
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]; ds.SOPInstanceUID = generate_uid()
    ds.save_as(tmp_path/'SCOUT')
    with pytest.warns(UserWarning, match='localizer'): vol = load_series(tmp_path)
    assert vol.shape[0] == 6

def test_instance_number_fallback(tmp_path):
    truth = synth_ct_series(tmp_path, n_slices=5, size=32, bad_instance_numbers=False, seed=10)
    for f in truth:
        ds = pydicom.dcmread(f); del ds.ImagePositionPatient; ds.save_as(f)
    with pytest.warns(UserWarning, match='InstanceNumber'): vol = load_series(tmp_path)
    inst = [int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) for f in vol.meta['fnames']]
    assert inst == sorted(inst)

def _enhanced_ct(fn, n=6, size=16, seed=0):
    "A minimal enhanced CT (PS3.3 A.38): frames stored out of order, positions in the per-frame groups."
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    stored = rng.integers(0, 1000, (n, size, size)).astype(np.int16)
    ds = Dataset(); ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = '1.2.840.10008.5.1.4.1.1.2.1'
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.PatientID = 'CT', 'E1'
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows = ds.Columns = size; ds.NumberOfFrames = n; ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = 'MONOCHROME2'; ds.BitsAllocated = ds.BitsStored = 16; ds.HighBit = 15
    ds.PixelRepresentation = 1
    sh = Dataset()
    po = Dataset(); po.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]; sh.PlaneOrientationSequence = Sequence([po])
    pm = Dataset(); pm.PixelSpacing = [0.5, 0.5]; pm.SliceThickness = 2.; sh.PixelMeasuresSequence = Sequence([pm])
    pv = Dataset(); pv.RescaleSlope = 1.; pv.RescaleIntercept = -1024.; pv.RescaleType = 'HU'
    sh.PixelValueTransformationSequence = Sequence([pv])
    ds.SharedFunctionalGroupsSequence = Sequence([sh])
    per = []
    for f in range(n):
        g = Dataset(); pp = Dataset(); pp.ImagePositionPatient = [0., 0., 2.*float(order[f])]
        g.PlanePositionSequence = Sequence([pp]); per.append(g)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = stored.tobytes()
    ds.save_as(fn, enforce_file_format=True)
    return stored, order

def test_enhanced_multiframe(tmp_path):
    stored, order = _enhanced_ct(tmp_path/'ENH')
    vol = load_series(tmp_path/'ENH', min_slices=3)
    assert vol.shape == (6, 16, 16)
    np.testing.assert_allclose(vol.spacing, (2., .5, .5))
    inv = np.argsort(order)                                  # frame stored at z index order[f]
    np.testing.assert_array_equal(vol.array, dicom_pixels(tmp_path/'ENH')[inv])
    np.testing.assert_allclose(vol.array, stored[inv].astype(np.float32) - 1024)

def test_resample_matches_scipy_zoom():
    rng = np.random.default_rng(0)
    a = ndimage.gaussian_filter(rng.normal(0, 300, (18, 40, 36)), 2).astype(np.float32)
    vol = Volume(a, spacing=(2.5, 0.7, 0.9))
    for zoom in [(2.5, 0.7, 0.9), (1.7, 1.3, 0.5)]:
        z = ndimage.zoom(a, zoom, order=1)
        r = resample(vol, shape=z.shape, order=1)
        assert r.shape == z.shape
        np.testing.assert_allclose(r.array, z, atol=1e-3*np.abs(a).max())
        np.testing.assert_allclose(np.array(r.spacing)*(np.array(z.shape)-1), np.array(vol.spacing)*(np.array(a.shape)-1))
    z0 = ndimage.zoom(a, (2.5, 0.7, 0.9), order=0, grid_mode=False)
    r0 = resample(vol, shape=z0.shape, order=0)
    assert (r0.array == z0).mean() > 0.95        # nearest neighbour: ties at .5 may round differently
    r = resample(vol, (1., 1., 1.))
    assert r.spacing == (1., 1., 1.)
    assert r.shape == (int(17*2.5)+1, int(39*0.7)+1, int(35*0.9)+1)
    grid = np.stack(np.meshgrid(*[np.arange(s)/o for s,o in zip(r.shape, vol.spacing)], indexing='ij'))
    np.testing.assert_allclose(r.array, ndimage.map_coordinates(a, grid, order=1), atol=1e-3*np.abs(a).max())
    np.testing.assert_allclose(r.origin, vol.origin)

def test_resample_torch_stays_on_device():
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    a = torch.randn(6, 10, 12)
    vol = Volume(a, spacing=(2., 1., 1.)).to(dev)
    r = resample(vol, (1., 1., 1.))
    assert isinstance(r.array, torch.Tensor) and r.array.device.type == dev
    np.testing.assert_allclose(r.array.cpu().numpy(), resample(Volume(a.numpy(), spacing=(2., 1., 1.)), 1.).array, atol=1e-5)
    with pytest.raises(ValueError, match='order'): resample(vol, 1., order=3)

def test_windowed_and_pictures(oblique):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    path, truth, _ = oblique
    vol = load_series(path)
    w = vol.windowed(40, 400).array
    np.testing.assert_array_equal(vol.windowed('bone').array, vol.windowed(400, 1800).array)
    assert w.min() >= 0 and w.max() <= 1 and 0 < w.mean() < 1
    axs = vol.show_grid(n=4, ncols=4); assert axs.size == 4
    ax = vol.hist(); assert ax.get_xlabel() == 'HU'
    plt.close('all')

def test_neighbour_stack_and_slice_table(oblique):
    path, truth, _ = oblique
    vol = load_series(path)
    s = neighbour_stack(vol.array, 0, k=2)
    assert s.shape == (5, 48, 48)
    np.testing.assert_array_equal(s[2], vol.array[0]); np.testing.assert_array_equal(s[0], vol.array[0])
    np.testing.assert_array_equal(neighbour_stack(vol.array, 19, 1)[2], vol.array[19])
    st = slice_table(path, k=1, progress=False)
    assert [Path(f) for f in st.fname] == [Path(f) for f in truth]
    assert st.fnames[5] == tuple(str(truth[i]) for i in (4, 5, 6))

def test_headers_with_sequences_and_implicit_vr(tmp_path):
    "Headers read by pydicom (sequences of defined/undefined length, nested; implicit VR; latin-1 text) give the records and the pixels."
    from pydicom.uid import ImplicitVRLittleEndian
    files = synth_ct_series(tmp_path/'s', n_slices=3, size=16, seed=11)
    inner = Dataset(); inner.CodeValue = 'X'; inner.CodeMeaning = 'nested'
    item = Dataset(); item.ReferencedSOPInstanceUID = generate_uid(); item.PurposeOfReferenceCodeSequence = Sequence([inner])
    for name, ts, undefined in [('expl_undef', ExplicitVRLittleEndian, True), ('expl_def', ExplicitVRLittleEndian, False),
                                ('impl_undef', ImplicitVRLittleEndian, True)]:
        for k, f in enumerate(files):
            ds = pydicom.dcmread(f)
            ds.ReferencedImageSequence = Sequence([item, item])
            ds.SeriesDescription = 'with sequences'
            ds['ReferencedImageSequence'].is_undefined_length = undefined
            for it in ds.ReferencedImageSequence:
                it.is_undefined_length_sequence_item = undefined
                it['PurposeOfReferenceCodeSequence'].is_undefined_length = undefined
            ds.file_meta.TransferSyntaxUID = ts
            fn = tmp_path/name/f'{k}'; fn.parent.mkdir(exist_ok=True)
            ds.save_as(fn, enforce_file_format=True)
            assert (fn.read_bytes().count(b'\xfe\xff\xdd\xe0') == 3) == undefined   # sequence delimiters written
            rec = slice_records(fn)[0]
            assert rec['SeriesDescription'] == 'with sequences' and rec['rows'] == 16 and rec['position'] is not None, name
        vol = load_series(tmp_path/name)
        for k in range(3): np.testing.assert_array_equal(vol.array[k], dicom_pixels(tmp_path/name/f'{k}'))
    ds = pydicom.dcmread(files[0])
    ds.PatientID = 'Müller'; ds.SpecificCharacterSet = 'ISO_IR 100'
    ds.save_as(tmp_path/'latin1', enforce_file_format=True)
    assert slice_records(tmp_path/'latin1')[0]['PatientID'] == 'Müller'
    # the same raw name bytes under another character set decode differently, even with a names cache shared by a scan
    b = (tmp_path/'latin1').read_bytes()                                  # Cyrillic: byte 0xFC is 'ќ'
    assert b.count(b'ISO_IR 100') == 1; (tmp_path/'cyrillic').write_bytes(b.replace(b'ISO_IR 100', b'ISO_IR 144'))
    raw = pydicom.dcmread(tmp_path/'cyrillic').get_item('PatientID').value
    assert raw == 'Müller'.encode('latin-1'), raw                        # same bytes as the latin-1 file
    cache = {}
    names = [slice_records(tmp_path/f, names_cache=cache)[0]['PatientID'] for f in ('latin1', 'cyrillic', 'latin1')]
    assert names == ['Müller', pydicom.dcmread(tmp_path/'cyrillic').PatientID, 'Müller'] and names[1] != 'Müller'
    assert len(cache) == 2

@pytest.mark.parametrize('signed,bits_stored,slope,intercept,padding,limit', [
    (True, 12, 1., -1024., -2000, None),                      # 12-bit signed, garbage above bit 11 on some pixels
    (False, 12, 0.5, -1000., 0, 5),                           # unsigned, padding range 0..5
    (True, 16, 2., 0., None, None),
])
def test_load_series_matches_dicom_pixels(tmp_path, signed, bits_stored, slope, intercept, padding, limit):
    "Slices decoded into the volume (headers read once) equal dicom_pixels bit for bit, Bits Stored and padding ranges included."
    files = synth_ct_series(tmp_path/'src', n_slices=3, size=24, seed=12)
    rng = np.random.default_rng(0)
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        if signed:
            px = rng.integers(-2048, 2047, (24, 24)).astype(np.int16)
            if bits_stored < 16: px[::3] = (px[::3].view(np.uint16) ^ 0x5000).view(np.int16)   # set unused high bits
        else: px = rng.integers(0, 4095, (24, 24)).astype(np.uint16)
        if padding is not None:                                   # padding pixels, as stored (12 bits: garbage above)
            pv = np.array([padding], np.int16 if signed else np.uint16)
            if bits_stored < 16: pv = ((pv.view(np.uint16) & 0x0FFF) | 0x5000).view(pv.dtype)
            px[:2] = pv[0]
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = int(signed), bits_stored, bits_stored - 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        for kw in ('PixelPaddingValue', 'PixelPaddingRangeLimit'):
            if kw in ds: del ds[kw]
        if padding is not None:
            ds.PixelPaddingValue = padding
            ds['PixelPaddingValue'].VR = 'SS' if signed else 'US'
            if limit is not None: ds.PixelPaddingRangeLimit = limit; ds['PixelPaddingRangeLimit'].VR = 'SS' if signed else 'US'
        ds.PixelData = px.tobytes()
        (tmp_path/'x').mkdir(exist_ok=True)
        ds.save_as(tmp_path/'x'/f'{k}.dcm', enforce_file_format=True)
    for pad_value in (None, -5000.):
        vol = load_series(tmp_path/'x', pad_value=pad_value)
        for k in range(3): np.testing.assert_array_equal(vol.array[k], dicom_pixels(tmp_path/'x'/f'{k}.dcm', pad_value=pad_value))
    if padding is not None and limit is not None: assert (vol.array == -5000.).sum() >= 3*48

def test_load_series_parses_each_header_once(tmp_path, monkeypatch):
    "load_series reads each header once (pydicom) and hands it to dicom_pixels, which doesn't parse it again."
    import fastdcm.core, fastdcm.pixels, fastdcm.volume
    files = synth_ct_series(tmp_path, n_slices=5, size=16, seed=13)
    calls = []
    real = fastdcm.core.dcmread
    def counting(fn, *a, **k): calls.append(Path(fn).name if isinstance(fn, (str, Path)) else 'fileobj'); return real(fn, *a, **k)
    monkeypatch.setattr(fastdcm.volume, 'dcmread', counting); monkeypatch.setattr(fastdcm.pixels, 'dcmread', counting)
    vol = load_series(tmp_path)
    assert sorted(calls) == sorted(f.name for f in files)
    for k in (0, 4): np.testing.assert_array_equal(vol.array[k], dicom_pixels(files[k]))

def test_mixed_bag_of_files_never_crashes():
    "pydicom's test files (reports, colour, multi-frame, localizers, odd syntaxes): rows with problems, no crash."
    import os
    from pydicom.data import get_testdata_file
    folder = os.path.dirname(get_testdata_file('CT_small.dcm'))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        df = find_series(folder, progress=False)
        assert len(df) > 20 and (df.problems != '').sum() > 10
        assert df.problems.str.contains('colour images').any()
        vols = list(iter_series(folder, progress=False, min_slices=1))
    assert len(vols) >= 5 and all(v.array.ndim == 3 and v.array.dtype == np.float32 for v in vols)

def test_volume_imports_no_fastai():
    "The lower layer stays fastai-free: a fresh interpreter importing fastdcm.volume loads no fastai module."
    import subprocess, sys
    code = "import sys, fastdcm.volume; print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in ('fastai', 'fasttransform')}))"
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == '[]', f'fastdcm.volume imported {out}'
    from fastdcm import volume
    assert not hasattr(volume, 'slice_datablock')      # the 2.5-D blocks live in fastdcm.volume_data now

def test_slice_datablock_splits_by_patient(tmp_path):
    "2.5-D DataBlock: (2k+1)-channel HU stacks, neighbours in position order, no patient on both sides."
    from fastdcm.transforms import TensorDicom, DicomResize
    from fastdcm.volume_data import slice_datablock, open_slice_stack
    for i in range(4): synth_ct_series(tmp_path/f'P{i}', n_slices=5, size=32, patient_id=f'P{i}', seed=20+i)
    # every patient also has a second series in another study: a split by series (or by slice) would leak patients
    for i in range(4): synth_ct_series(tmp_path/f'P{i}b', n_slices=5, size=32, patient_id=f'P{i}', seed=30+i)
    st = slice_table(tmp_path, k=2, progress=False)
    assert len(st) == 40 and st.groupby('SeriesInstanceUID').slice.max().eq(4).all()
    assert st.groupby('PatientID').SeriesInstanceUID.nunique().eq(2).all()
    st['label'] = np.where(st.slice % 2 == 0, 'even', 'odd')
    for seed in range(4):
        db = slice_datablock(valid_pct=0.25, seed=seed, item_tfms=DicomResize(24))
        trn, val = db.splitter(st)
        assert set(st.PatientID.iloc[list(trn)]).isdisjoint(st.PatientID.iloc[list(val)]) and len(val) == 10
    dls = slice_datablock(valid_pct=0.25, seed=1, item_tfms=DicomResize(24)).dataloaders(st, bs=4)
    xb, yb = dls.one_batch()
    assert isinstance(xb, TensorDicom) and xb.shape == (4, 5, 24, 24) and xb.max() > 255
    assert set(dls.train.items.PatientID).isdisjoint(dls.valid.items.PatientID) and len(dls.valid.items) == 10
    row = st[st.slice == 0].iloc[0]
    x = open_slice_stack(row.fnames)
    np.testing.assert_array_equal(x[0].numpy(), x[2].numpy())     # clamped at the first slice
    np.testing.assert_array_equal(x[4].numpy(), dicom_pixels(st[(st.SeriesInstanceUID == row.SeriesInstanceUID) & (st.slice == 2)].fname.item()))

def test_grid_from_headers_only(tmp_path, monkeypatch):
    "load_series(decode=False): the same geometry and identity as the decoded volume, no pixel decoded."
    import fastdcm.volume as V
    files = synth_ct_series(tmp_path/'s', n_slices=6, size=16, seed=4)
    vol = load_series(tmp_path/'s')
    monkeypatch.setattr(V, 'dicom_pixels', lambda *a, **k: (_ for _ in ()).throw(AssertionError('decoded')))
    grid = load_series(tmp_path/'s', decode=False)
    assert grid.array is None and grid.shape == vol.shape == (6, 16, 16)
    np.testing.assert_allclose(grid.affine, vol.affine)
    sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]   # files in true order
    assert grid.meta['SOPInstanceUIDs'] == vol.meta['SOPInstanceUIDs'] == sops
    assert grid.meta['FrameOfReferenceUID'] == str(pydicom.dcmread(files[0], stop_before_pixels=True).FrameOfReferenceUID)
