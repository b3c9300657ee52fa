"Round-trip tests for fastdcm.synth: what the files hold must be what was meant (values, headers, geometry, labels)."
import math, warnings
from pathlib import Path
import numpy as np, pandas as pd
import pytest, pydicom
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import RLELossless, ImplicitVRLittleEndian, ExplicitVRLittleEndian
from fastdcm.synth import *
from fastdcm.core import DicomError, TruncatedDicomError, NotDicomError, dcmread as fdcmread


@pytest.mark.parametrize('modality', ['CR', 'DX', 'CT', 'MR'])
@pytest.mark.parametrize('bits', [8, 12, 16])
@pytest.mark.parametrize('signed', [False, True])
def test_roundtrip_values(tmp_path, modality, bits, signed):
    slope, icpt = (8., -1024. + (1024. if signed else 0.)) if (modality == 'CT' and bits == 8) else (1., -1024.)
    if modality == 'CT' and signed and bits > 8: icpt = 0.
    fn, v = synth_dicom(tmp_path/'a.dcm', modality=modality, bits_stored=bits, signed=signed, slope=slope,
                        intercept=icpt, size=48, finding=True, seed=bits, return_values=True)
    ds = pydicom.dcmread(fn)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == SOP_CLASSES[modality] and ds.Modality == modality
    assert (ds.BitsStored, ds.BitsAllocated, ds.HighBit, ds.PixelRepresentation) == (
        bits, 8 if bits == 8 else 16, bits - 1, int(signed))
    np.testing.assert_array_equal(ds.pixel_array, v['stored'])
    np.testing.assert_array_equal(apply_modality_lut(ds.pixel_array, ds), v['modality'])
    lo, hi = stored_range(bits, signed)
    assert lo <= v['stored'].min() and v['stored'].max() <= hi
    if modality == 'CT':   # real HU: air near -1000, bone/lesion well above soft tissue
        assert v['modality'].min() <= -900 and v['modality'].max() >= 400
        assert ds.RescaleType == 'HU'


def test_ct_hu_exact(tmp_path):
    img = np.array([[0., .45], [.52, .85]], np.float32)
    fn = synth_dicom(tmp_path/'a.dcm', img, bits_stored=12, signed=False)
    ds = pydicom.dcmread(fn)
    np.testing.assert_array_equal(apply_modality_lut(ds.pixel_array, ds), [[-1000, -100], [40, 700]])


def test_integer_image_is_stored_verbatim(tmp_path):
    a = np.arange(-8, 8, dtype=np.int16).reshape(4, 4)
    ds = pydicom.dcmread(synth_dicom(tmp_path/'a.dcm', a, bits_stored=12, signed=True))
    np.testing.assert_array_equal(ds.pixel_array, a)
    with pytest.raises(ValueError): synth_dicom(tmp_path/'b.dcm', a, bits_stored=12, signed=False)


def test_monochrome1_inverts_stored_values(tmp_path):
    kw = dict(modality='DX', bits_stored=16, signed=False, size=48, finding=True, seed=3)
    p1 = pydicom.dcmread(synth_dicom(tmp_path/'m1.dcm', photometric='MONOCHROME1', **kw))
    p2 = pydicom.dcmread(synth_dicom(tmp_path/'m2.dcm', photometric='MONOCHROME2', **kw))
    assert p1.PhotometricInterpretation == 'MONOCHROME1'
    np.testing.assert_array_equal(p1.pixel_array.astype(int), 65535 - p2.pixel_array.astype(int))


@pytest.mark.parametrize('kw', [dict(modality='CT', bits_stored=16, signed=True),
                                dict(modality='CR', bits_stored=12, signed=False, photometric='MONOCHROME1'),
                                dict(modality='DX', bits_stored=8, signed=True),
                                dict(modality='US', photometric='RGB'),
                                dict(modality='CT', enhanced=True, frames=3),
                                dict(modality='MR', frames=3)])
def test_rle_decodes_to_same_values(tmp_path, kw):
    plain = pydicom.dcmread(synth_dicom(tmp_path/'plain.dcm', size=32, seed=1, **kw))
    rle = pydicom.dcmread(synth_dicom(tmp_path/'rle.dcm', size=32, seed=1, compress='rle', **kw))
    assert rle.file_meta.TransferSyntaxUID == RLELossless
    assert rle.SOPInstanceUID != '' and rle.SOPInstanceUID == rle.file_meta.MediaStorageSOPInstanceUID
    np.testing.assert_array_equal(rle.pixel_array, plain.pixel_array)


def test_implicit_vr(tmp_path):
    fn, v = synth_dicom(tmp_path/'i.dcm', transfer_syntax='implicit', size=32, padding_value=-2000,
                        return_values=True)
    ds = pydicom.dcmread(fn)
    assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert ds.PixelPaddingValue == -2000
    np.testing.assert_array_equal(ds.pixel_array, v['stored'])


def test_windows_and_voi_function(tmp_path):
    wins = [(40, 400, 'SOFT TISSUE'), (-600, 1500, 'LUNG'), (500, 2000, 'BONE')]
    ds = pydicom.dcmread(synth_dicom(tmp_path/'w.dcm', size=16, windows=wins, voi_function='LINEAR_EXACT'))
    assert list(map(float, ds.WindowCenter)) == [40., -600., 500.]
    assert list(map(float, ds.WindowWidth)) == [400., 1500., 2000.]
    assert list(ds.WindowCenterWidthExplanation) == ['SOFT TISSUE', 'LUNG', 'BONE']
    assert ds.VOILUTFunction == 'LINEAR_EXACT'


def test_modality_lut_and_voi_lut(tmp_path):
    fn, v = synth_dicom(tmp_path/'l.dcm', modality='MR', bits_stored=16, signed=True, modality_lut=True,
                        voi_lut=True, size=32, return_values=True)
    ds = pydicom.dcmread(fn)
    assert 'RescaleSlope' not in ds
    # PS3.3 C.11.1.1.1 by hand, in int64 (pydicom's apply_modality_lut subtracts the first mapped value in the
    # pixel dtype, which overflows int16 when the LUT spans more than 32767 values)
    item = ds.ModalityLUTSequence[0]
    n, first, bits = item.LUTDescriptor
    assert item['LUTDescriptor'].VR == 'SS' and first < 0 and bits == 16
    lut = np.frombuffer(item.LUTData, '<u2').astype(np.int64)
    assert len(lut) == n
    m = lut[np.clip(ds.pixel_array.astype(np.int64) - first, 0, n - 1)]
    np.testing.assert_array_equal(m, v['modality'])
    assert len(np.unique(m)) > 50                      # a real, non-constant mapping
    d = np.diff(lut)
    assert (d >= 0).all() and d[:10].mean() > d[-10:].mean()    # monotone, concave (sqrt)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        out = apply_voi_lut(m.astype(np.int64), ds, prefer_lut=True)
    assert out.min() == 0 and out.max() == 65535


def test_padding_value_and_range(tmp_path):
    fn, v = synth_dicom(tmp_path/'p.dcm', modality='CR', bits_stored=12, signed=False, size=40,
                        padding_value=0, padding_range=100, return_values=True)
    ds = pydicom.dcmread(fn)
    assert (ds.PixelPaddingValue, ds.PixelPaddingRangeLimit) == (0, 100)
    px, m = ds.pixel_array, v['padding']
    np.testing.assert_array_equal(m, ~fov_mask(40, 40))
    assert m.sum() > 0 and px[m].max() <= 100 and px[~m].min() > 100
    with pytest.raises(ValueError): synth_dicom(tmp_path/'q.dcm', bits_stored=12, signed=False, padding_value=-2000)


@pytest.mark.parametrize('modality', ['CT', 'MR'])
def test_enhanced_functional_groups(tmp_path, modality):
    fn, v = synth_dicom(tmp_path/'e.dcm', modality=modality, enhanced=True, frames=5, size=32,
                        slope=1., intercept=-1024., rescale=True, windows=[(40, 400, 'A'), (300, 1500, 'B')],
                        voi_function='SIGMOID', return_values=True)
    ds = pydicom.dcmread(fn)
    assert ds.SOPClassUID == SOP_CLASSES[modality + '_ENH'] and ds.NumberOfFrames == 5
    assert 'RescaleSlope' not in ds and 'WindowCenter' not in ds
    px = ds.pixel_array
    assert px.shape == (5, 32, 32)
    pf = ds.PerFrameFunctionalGroupsSequence
    sh = ds.SharedFunctionalGroupsSequence[0]
    assert list(map(float, sh.PlaneOrientationSequence[0].ImageOrientationPatient)) == [1, 0, 0, 0, 1, 0]
    slopes = []
    for f, item in enumerate(pf):
        t = item.PixelValueTransformationSequence[0]
        slopes.append(float(t.RescaleSlope))
        np.testing.assert_array_equal(px[f]*float(t.RescaleSlope) + float(t.RescaleIntercept), v['modality'][f])
        voi = item.FrameVOILUTSequence[0]
        assert list(map(float, voi.WindowCenter)) == [40. + 10*f, 300. + 10*f] and voi.VOILUTFunction == 'SIGMOID'
        np.testing.assert_allclose(list(map(float, item.PlanePositionSequence[0].ImagePositionPatient)),
                                   v['positions'][f], atol=1e-4)
    assert len(set(slopes)) == 3
    z = [float(i.PlanePositionSequence[0].ImagePositionPatient[2]) for i in pf]
    np.testing.assert_allclose(np.diff(z), 1.0, atol=1e-4)
    # frames differ: they are slices of a 3-D phantom
    assert all(not np.array_equal(v['modality'][f], v['modality'][f + 1]) for f in range(4))


def test_enhanced_shared_groups(tmp_path):
    ds = pydicom.dcmread(synth_dicom(tmp_path/'s.dcm', enhanced=True, frames=3, size=16, per_frame=False,
                                     slope=2., intercept=-1000., windows=[(40, 400)]))
    sh = ds.SharedFunctionalGroupsSequence[0]
    assert float(sh.PixelValueTransformationSequence[0].RescaleSlope) == 2.
    assert float(sh.FrameVOILUTSequence[0].WindowCenter) == 40.
    assert 'PixelValueTransformationSequence' not in ds.PerFrameFunctionalGroupsSequence[0]


def test_classic_multiframe(tmp_path):
    fn, v = synth_dicom(tmp_path/'mf.dcm', modality='CR', frames=3, size=24, bits_stored=8, signed=False,
                        return_values=True)
    ds = pydicom.dcmread(fn)
    assert ds.NumberOfFrames == 3 and ds.SOPClassUID == SOP_CLASSES['SC_MF_BYTE']
    np.testing.assert_array_equal(ds.pixel_array, v['stored'])
    assert not np.array_equal(v['stored'][0], v['stored'][1])


def test_us(tmp_path):
    g = pydicom.dcmread(synth_dicom(tmp_path/'g.dcm', modality='US', size=32))
    assert (g.BitsStored, g.BitsAllocated, g.PixelRepresentation, g.SamplesPerPixel) == (8, 8, 0, 1)
    c = pydicom.dcmread(synth_dicom(tmp_path/'c.dcm', modality='US', photometric='RGB', size=32))
    a = c.pixel_array
    assert a.shape == (32, 32, 3) and (a[..., 0] != a[..., 2]).any()   # colour Doppler blob
    with pytest.raises(ValueError): synth_dicom(tmp_path/'x.dcm', modality='CT', photometric='RGB')


def test_determinism(tmp_path):
    for d in ('a', 'b'):
        synth_dicom(tmp_path/d/'x.dcm', modality='CT', size=32, seed=4, windows=[(40, 400)], enhanced=True, frames=2)
        synth_ct_series(tmp_path/d/'s', n_slices=4, size=16, seed=4)
    assert (tmp_path/'a'/'x.dcm').read_bytes() == (tmp_path/'b'/'x.dcm').read_bytes()
    fa, fb = sorted((tmp_path/'a'/'s').iterdir()), sorted((tmp_path/'b'/'s').iterdir())
    assert [f.name for f in fa] == [f.name for f in fb]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb))
    assert not np.array_equal(synth_image('head', 32, seed=1), synth_image('head', 32, seed=2))


def test_extra_tags(tmp_path):
    ds = pydicom.dcmread(synth_dicom(tmp_path/'x.dcm', size=16, PatientName='Doe^Jane', AccessionNumber=None))
    assert ds.PatientName == 'Doe^Jane' and 'AccessionNumber' not in ds


# ---------------------------------------------------------------- study set
@pytest.fixture(scope='module')
def study(tmp_path_factory):
    path = tmp_path_factory.mktemp('set')
    return path, synth_study_set(path, n_patients=10, images_per_patient=4, size=64, seed=3, compress_frac=0.2)


def test_study_set_labels(study):
    path, df = study
    assert len(df) == 40
    assert (df.groupby('PatientID').label.nunique() == 1).all()
    assert df.drop_duplicates('PatientID').label.value_counts().to_dict() == {'finding': 5, 'normal': 5}
    csv = pd.read_csv(path/'labels.csv')
    assert csv.fname.tolist() == df.fname.tolist() and csv.label.tolist() == df.label.tolist()
    assert all(Path(f).is_absolute() and Path(f).exists() for f in df.fname)
    assert df.lesion_radius.notna().tolist() == (df.label == 'finding').tolist()
    assert df.lesion_radius.dropna().between(0.09*64, 0.16*64).all()


def test_study_set_headers(study):
    _, df = study
    for r in df.itertuples():
        ds = pydicom.dcmread(r.fname)
        assert (ds.PatientID, ds.StudyInstanceUID, ds.Modality, ds.PhotometricInterpretation, ds.BitsStored,
                ds.PixelRepresentation) == (r.PatientID, r.StudyInstanceUID, r.Modality, r.PhotometricInterpretation,
                                            r.BitsStored, r.PixelRepresentation)
        assert ds.pixel_array.shape == (64, 64)
    assert df.groupby('PatientID').StudyInstanceUID.nunique().max() == 1
    assert df.StudyInstanceUID.nunique() == 10


def test_study_set_mix(tmp_path):
    df = synth_study_set(tmp_path, n_patients=16, images_per_patient=4, size=16, seed=0)
    assert set(df.Modality) == {'CR', 'DX', 'CT'}
    assert set(df.PhotometricInterpretation) == {'MONOCHROME1', 'MONOCHROME2'}
    assert set(df.BitsStored) == {8, 12, 16} and set(df.PixelRepresentation) == {0, 1}
    assert set(df.rescale) == {True, False}
    assert set(df.windows) == {0, 1, 2}
    for r in df[(df.windows == 1)].itertuples():   # X-ray windows cover the image (in modality values)
        ds = pydicom.dcmread(r.fname)
        m = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
        c, w = float(ds.WindowCenter), float(ds.WindowWidth)
        assert c - w/2 <= np.percentile(m, 50) <= c + w/2 and w > 0.5*(m.max() - m.min())


def _display(fn):
    "Modality values, min-max scaled, MONOCHROME1 inverted: what a reader would show."
    ds = pydicom.dcmread(fn)
    a = apply_modality_lut(ds.pixel_array, ds).astype(float)
    a = (a - a.min())/(a.max() - a.min())
    return 1 - a if ds.PhotometricInterpretation == 'MONOCHROME1' else a


def test_study_set_lesion_is_bright(study):
    "At the lesion centre the displayed image is bright; the same spot in the normal twin image is darker."
    _, df = study
    for r in df[df.label == 'finding'].itertuples():
        d = _display(r.fname)
        rr, cc = int(r.lesion_row), int(r.lesion_col)
        assert d[rr-2:rr+3, cc-2:cc+3].mean() > np.percentile(d, 75), r.fname


# ---------------------------------------------------------------- CT series
def _sorted_by_normal(files):
    dss = [pydicom.dcmread(f) for f in files]
    iop = np.array(dss[0].ImageOrientationPatient, float)
    n = np.cross(iop[:3], iop[3:])
    proj = [np.array(d.ImagePositionPatient, float) @ n for d in dss]
    return dss, np.array(proj)


@pytest.mark.parametrize('orientation', ['axial', 'coronal', 'sagittal',
                                         (0.8660254, 0.5, 0., -0.3535534, 0.6123724, -0.7071068)])
def test_ct_series_geometry(tmp_path, orientation):
    files, t = synth_ct_series(tmp_path, n_slices=10, size=32, orientation=orientation, slice_spacing=0.625,
                               pixel_spacing=(0.7, 0.8), per_slice_slope=True, seed=1, return_truth=True)
    assert len(files) == 10 and all(f.suffix == '' for f in files)
    assert sorted(files) != files                                 # shuffled names
    dss, proj = _sorted_by_normal(files)
    assert (np.diff(proj) > 0).all()                              # returned in true spatial order
    np.testing.assert_allclose(np.diff(proj), 0.625, atol=1e-4)
    inst = [d.InstanceNumber for d in dss]
    assert sorted(inst) == list(range(1, 11)) and inst != sorted(inst) and inst != sorted(inst)[::-1]
    for k, d in enumerate(dss):
        assert list(map(float, d.PixelSpacing)) == [0.7, 0.8]
        np.testing.assert_allclose(np.array(d.ImagePositionPatient, float), t.positions[k], atol=1e-4)
        hu = apply_modality_lut(d.pixel_array, d)
        np.testing.assert_array_equal(hu[~t.padding], t.hu[k][~t.padding])
        assert (d.pixel_array[t.padding] == -2000).all() and d.PixelPaddingValue == -2000
    assert len({float(d.RescaleSlope) for d in dss}) == 3
    # voxel (i, j) of slice k lies where the affine says
    k, i, j = 4, 5, 9
    P = t.positions[k] + j*0.8*t.orientation[:3] + i*0.7*t.orientation[3:]
    np.testing.assert_allclose(t.affine @ [j, i, k, 1], [*P, 1], atol=1e-6)


def test_ct_series_anatomy_varies_and_is_realistic(tmp_path):
    _, t = synth_ct_series(tmp_path, n_slices=16, size=64, return_truth=True)
    hu = t.hu[:, ~t.padding]
    assert hu.min() >= -1024 and (hu < -900).any() and (hu > 600).any()
    assert ((hu > 20) & (hu < 80)).mean() > 0.2                        # plenty of soft tissue
    assert all(not np.array_equal(t.hu[k], t.hu[k + 1]) for k in range(15))
    np.testing.assert_array_equal(synth_ct_volume(n_slices=16, size=64).hu, t.hu)   # the truth helper agrees
    np.testing.assert_array_equal(t.slice_hu(5), t.hu[5])


def test_ct_series_drop_duplicate_tilt(tmp_path):
    files, t = synth_ct_series(tmp_path, n_slices=8, size=16, drop=[2, 6], duplicate=[4], tilt_deg=20.,
                               shuffle=False, extensionless=False, bad_instance_numbers=False, return_truth=True)
    assert t.file_slices == [0, 1, 3, 4, 4, 5, 7]
    assert [f.name for f in files] == [f'IM{i:04d}.dcm' for i in range(1, 8)]
    dss = [pydicom.dcmread(f) for f in files]
    assert [d.InstanceNumber for d in dss] == [1, 2, 4, 5, 5, 6, 8]
    assert dss[3].ImagePositionPatient == dss[4].ImagePositionPatient
    assert dss[3].SOPInstanceUID != dss[4].SOPInstanceUID
    assert len({d.SeriesInstanceUID for d in dss}) == 1
    pos = np.array([d.ImagePositionPatient for d in dss], float)
    step = pos[1] - pos[0]
    np.testing.assert_allclose(step, [0, 0.625*math.tan(math.radians(20)), 0.625], atol=1e-4)
    np.testing.assert_allclose(pos[2] - pos[1], 2*step, atol=1e-4)   # the gap of the dropped slice
    assert float(dss[0].GantryDetectorTilt) == 20.


# ---------------------------------------------------------------- bad files
def test_bad_files(tmp_path):
    bad = synth_bad_files(tmp_path)
    with pytest.raises(TruncatedDicomError, match='truncated.dcm'): fdcmread(bad['truncated'])
    with pytest.raises(NotDicomError, match='not_dicom.dcm'): fdcmread(bad['not_dicom'])
    with pytest.raises(DicomError, match='empty.dcm'): fdcmread(bad['empty'])
    ds = fdcmread(bad['no_pixels'])
    assert 'PixelData' not in ds and ds.Rows == 32
    ds = fdcmread(bad['short_pixels'])
    assert len(ds.PixelData) < ds.Rows*ds.Columns*2
    with pytest.raises(Exception): ds.pixel_array
    with pytest.raises(pydicom.errors.InvalidDicomError): pydicom.dcmread(bad['no_preamble'])   # pydicom wants force=True
    ds = fdcmread(bad['no_preamble'])     # fastdcm reads a dataset that starts with a plausible element (PS3.5 7.1, issue 8)
    assert ds.Rows == 32 and 'PixelData' in ds
    ds = pydicom.dcmread(bad['unsupported_ts'])
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    with pytest.raises(Exception): ds.pixel_array
    assert float(pydicom.dcmread(bad['bad_window']).WindowWidth) == 0.


def test_bad_files_raise_typed_pixel_errors(tmp_path):
    "What the pixel pipeline (fastdcm.pixels, written in parallel) is expected to raise for each bad file."
    pixels = pytest.importorskip('fastdcm.pixels')
    from fastdcm.core import NoPixelDataError, PixelDataLengthError, UnsupportedTransferSyntaxError, BadWindowError
    bad = synth_bad_files(tmp_path)
    expected = dict(truncated=TruncatedDicomError, not_dicom=NotDicomError, empty=DicomError,
                    no_pixels=NoPixelDataError, short_pixels=PixelDataLengthError,
                    unsupported_ts=UnsupportedTransferSyntaxError)
    for case, err in expected.items():
        with pytest.raises(err, match=bad[case].name): pixels.dicom_pixels(bad[case])
    with pytest.raises(BadWindowError, match='bad_window.dcm'): pixels.dicom_pixels(bad['bad_window'], 'display')


def test_enhanced_oblique_shuffled_frames(tmp_path):
    iop = (0.8660254, 0.5, 0., -0.3535534, 0.6123724, -0.7071068)
    fn, v = synth_dicom(tmp_path/'e.dcm', enhanced=True, frames=7, size=24, orientation=iop, slice_spacing=1.25,
                        shuffle_frames=True, per_frame=False, return_values=True)
    ds = pydicom.dcmread(fn)
    pf = ds.PerFrameFunctionalGroupsSequence
    order = v['order']
    assert sorted(order) == list(range(7)) and list(order) != list(range(7))
    n = np.cross(iop[:3], iop[3:])
    proj = np.array([np.array(f.PlanePositionSequence[0].ImagePositionPatient, float) @ n for f in pf])
    np.testing.assert_array_equal(np.argsort(proj), np.argsort(order))      # positions follow the true order
    np.testing.assert_allclose(np.diff(np.sort(proj)), 1.25, atol=1e-4)
    assert [f.FrameContentSequence[0].InStackPositionNumber for f in pf] == list(order + 1)
    # the frame stored at f is slice order[f] of the unshuffled object
    ref = synth_dicom(tmp_path/'r.dcm', enhanced=True, frames=7, size=24, orientation=iop, slice_spacing=1.25,
                      per_frame=False, return_values=True)[1]
    np.testing.assert_array_equal(v['modality'], ref['modality'][order])


def test_two_series_in_one_folder_do_not_collide(tmp_path):
    a = synth_ct_series(tmp_path, n_slices=5, size=16, patient_id='PA')
    b = synth_ct_series(tmp_path, n_slices=5, size=16, patient_id='PB')
    assert not set(a) & set(b) and len(list(tmp_path.iterdir())) == 10
    assert pydicom.dcmread(a[0]).SeriesInstanceUID != pydicom.dcmread(b[0]).SeriesInstanceUID


@pytest.mark.parametrize('modality', ['CR', 'MR'])
def test_rescale_written_when_asked(tmp_path, modality):
    assert 'RescaleSlope' not in pydicom.dcmread(synth_dicom(tmp_path/'a.dcm', modality=modality, size=16))
    fn, v = synth_dicom(tmp_path/'b.dcm', modality=modality, size=16, slope=0.5, intercept=10., return_values=True)
    ds = pydicom.dcmread(fn)
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (0.5, 10.)
    np.testing.assert_array_equal(v['modality'], ds.pixel_array*0.5 + 10.)
    ds = pydicom.dcmread(synth_dicom(tmp_path/'c.dcm', modality=modality, size=16, rescale=True))
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1., -1024.)


def test_mr_series(tmp_path):
    files, t = synth_ct_series(tmp_path, n_slices=6, size=24, modality='MR', per_slice_slope=True, seed=2,
                               return_truth=True)
    dss, proj = _sorted_by_normal(files)
    assert (np.diff(proj) > 0).all()
    for k, d in enumerate(dss):
        assert d.SOPClassUID == SOP_CLASSES['MR'] and d.PixelRepresentation == 0 and 'PixelPaddingValue' not in d
        np.testing.assert_array_equal(apply_modality_lut(d.pixel_array, d), t.values[k])
    assert len({float(d.RescaleSlope) for d in dss}) == 3
    # same anatomy as the CT series: fat is the brightest soft tissue on T1
    fat = (t.hu > -150) & (t.hu < -50)
    assert t.values[fat].mean() > t.values[(t.hu > 20) & (t.hu < 80)].mean()


def test_user_image_shapes(tmp_path):
    img = np.random.default_rng(0).random((20, 30)).astype(np.float32)
    fn, v = synth_dicom(tmp_path/'r.dcm', img, padding_value=-2000, return_values=True)
    ds = pydicom.dcmread(fn)
    assert (ds.Rows, ds.Columns) == (20, 30)
    np.testing.assert_array_equal(ds.pixel_array, v['stored'])
    fn, v = synth_dicom(tmp_path/'odd.dcm', modality='CR', bits_stored=8, signed=False, size=15, return_values=True)
    np.testing.assert_array_equal(pydicom.dcmread(fn).pixel_array, v['stored'])   # odd length padded to even
    ds = pydicom.dcmread(synth_dicom(tmp_path/'f.dcm', np.stack([img]*3), modality='MR'))
    assert ds.NumberOfFrames == 3
    with pytest.raises(ValueError, match='frames'): synth_dicom(tmp_path/'x.dcm', img, frames=3)
    with pytest.raises(ValueError): synth_dicom(tmp_path/'y.dcm', modality='XA')
    with pytest.raises(ValueError): synth_dicom(tmp_path/'z.dcm', modality='CR', enhanced=True)
    with pytest.raises(ValueError): synth_dicom(tmp_path/'w.dcm', enhanced=True, frames=2, voi_lut=True)


def test_study_set_modalities_and_compression(tmp_path):
    df = synth_study_set(tmp_path, n_patients=4, images_per_patient=3, size=16, seed=5, modalities=('CR',),
                         compress_frac=1.)
    assert set(df.Modality) == {'CR'} and df.compressed.all()
    assert all(pydicom.dcmread(f).file_meta.TransferSyntaxUID == RLELossless for f in df.fname)
    with pytest.raises(ValueError): synth_study_set(tmp_path/'x', n_patients=2, modalities=('XA',))


def test_us_multiframe(tmp_path):
    fn, v = synth_dicom(tmp_path/'cine.dcm', modality='US', frames=4, size=32, return_values=True)
    ds = pydicom.dcmread(fn)
    assert ds.SOPClassUID == SOP_CLASSES['US_MF'] and ds.NumberOfFrames == 4 and ds.BitsStored == 8
    assert ds.FrameIncrementPointer == 0x00181063
    np.testing.assert_array_equal(ds.pixel_array, v['stored'])
    assert not np.array_equal(v['stored'][0], v['stored'][1])   # speckle changes frame to frame


def test_hu_density_inverse():
    hu = np.array([-1000, -100, 0, 40, 700, 3000], np.float32)
    np.testing.assert_allclose(density_to_hu(hu_to_density(hu)), hu, atol=1e-3)
    np.testing.assert_allclose(hu_to_density([-1000, 0, 700]), [0, .5, .85], atol=1e-6)

# ---- nodules, DICOM SEG and RT Structure Set (3-D masks)

def test_nodule_series_seg_and_rtstruct(tmp_path):
    "The nodule is in the HU, the SEG frames are the truth mask on the referenced slices, the RTSTRUCT circles lie on the slice planes."
    from fastdcm.synth import synth_nodule_series, SEG_SOP_CLASS, RTSTRUCT_SOP_CLASS
    case = synth_nodule_series(tmp_path/'a', seed=7, patient_id='N7')
    hdrs = [pydicom.dcmread(f) for f in case.files]
    hu = np.stack([h.pixel_array*float(h.RescaleSlope) + float(h.RescaleIntercept) for h in hdrs])
    inside, shell = case.mask == 1, (case.mask == 0)
    assert inside.sum() > 50 and hu[inside].mean() > 100
    seg = pydicom.dcmread(case.seg)
    assert seg.SOPClassUID == SEG_SOP_CLASS and seg.SegmentationType == 'BINARY' and seg.BitsAllocated == 1
    assert seg.FrameOfReferenceUID == hdrs[0].FrameOfReferenceUID and seg.PatientID == 'N7'
    sops = [h.SOPInstanceUID for h in hdrs]
    px = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    seen = set()
    for f, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        k = sops.index(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        assert list(item.PlanePositionSequence[0].ImagePositionPatient) == list(hdrs[k].ImagePositionPatient)
        np.testing.assert_array_equal(px[f].astype(bool), inside[k]); seen.add(k)
    assert seen == {k for k in range(len(hdrs)) if inside[k].any()}
    rt = pydicom.dcmread(case.rtstruct)
    assert rt.SOPClassUID == RTSTRUCT_SOP_CLASS and rt.StructureSetROISequence[0].ROIName == 'nodule'
    zs = {round(float(h.ImagePositionPatient[2]), 3) for h in hdrs}
    for c in rt.ROIContourSequence[0].ContourSequence:
        p = np.asarray(c.ContourData, float).reshape(-1, 3)
        assert c.ContourGeometricType == 'CLOSED_PLANAR' and len({round(z, 3) for z in p[:, 2]}) == 1 and round(p[0, 2], 3) in zs

def test_nodule_series_same_bytes(tmp_path):
    from fastdcm.synth import synth_nodule_series
    a = synth_nodule_series(tmp_path/'a', seed=3)
    b = synth_nodule_series(tmp_path/'b', seed=3)
    for x, y in ((a.seg, b.seg), (a.rtstruct, b.rtstruct), (a.files[5], b.files[5])):
        assert open(x, 'rb').read() == open(y, 'rb').read()
    c = synth_nodule_series(tmp_path/'c', nodule=False, seed=3)
    assert c.seg is None and c.mask.max() == 0 and c.label == 'none'
