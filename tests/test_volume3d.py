"Acceptance tests for the 3-D fastai layer (fastdcm.volume_data) and 3-D masks: blocks, item and batch transforms, SEG/RTSTRUCT alignment."
import math, warnings
import numpy as np, pandas as pd, pytest, torch, pydicom
from fastai.data.all import DataBlock, CategoryBlock, ColReader
from fastdcm.core import DicomError
from fastdcm.synth import synth_nodule_series, synth_dicom, synth_rtstruct, sphere_contours
from fastdcm.volume import load_series, resample, seg_to_volume, rtstruct_to_volume, VolumeMaskError
from fastdcm.volume_data import *
from fastdcm.data import PatientSplitter

def _iou(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return (a & b).sum() / (a | b).sum()

def _oblique(deg=25.):
    a = math.radians(deg)
    return (1., 0., 0., 0., math.cos(a), -math.sin(a))

@pytest.fixture(scope='module')
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp('nodules')
    return [synth_nodule_series(root/f'P{i}', nodule=i != 3, seed=40+i, patient_id=f'P{i}') for i in range(4)]

@pytest.mark.parametrize('orientation', ['axial', 'oblique'])
def test_seg_and_rtstruct_align_with_phantom(tmp_path, orientation):
    "SEG is the truth voxel for voxel; the RTSTRUCT's exact circles rasterise to IoU >= 0.9 (axial and oblique series)."
    kw = {} if orientation == 'axial' else dict(orientation=_oblique())
    for seed in (1, 2):
        case = synth_nodule_series(tmp_path/f'{orientation}{seed}', seed=seed, **kw)
        grid = load_series(case.folder, decode=False)
        seg, names = seg_to_volume(case.seg, grid)
        rt, rt_names = rtstruct_to_volume(case.rtstruct, grid)
        assert names == rt_names == ['background', 'nodule'] and case.mask.sum() > 50
        np.testing.assert_array_equal(seg, case.mask)
        assert _iou(rt == 1, case.mask == 1) >= 0.9
        # the mask through the fastai layer: same values, the series' geometry
        m = open_volume_mask(case.rtstruct, case.folder, codes=['background', 'nodule'])
        assert isinstance(m, TensorMask3D) and m.codes == ['background', 'nodule']
        np.testing.assert_array_equal(m.numpy(), rt)
        np.testing.assert_allclose(m.origin, grid.origin)

def test_masks_refuse_another_series_or_frame_of_reference(tmp_path, cases):
    a, b = cases[0], cases[1]
    other = load_series(b.folder, decode=False)
    for fn, reader in ((a.seg, seg_to_volume), (a.rtstruct, rtstruct_to_volume)):
        with pytest.raises(VolumeMaskError, match='references series'): reader(fn, other)
    # a structure set that names no series, only another frame of reference
    ds = pydicom.dcmread(a.rtstruct)
    for st in ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence: del st.RTReferencedSeriesSequence
    ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = '1.2.3.4'
    with pytest.raises(VolumeMaskError, match='frame of reference'): rtstruct_to_volume(ds, load_series(a.folder, decode=False))
    with pytest.raises(DicomError, match='a 3-D mask must be a SEG or an RTSTRUCT'): open_volume_mask(a.files[0], a.folder)

def test_seg_frame_off_the_grid_refused(tmp_path, cases):
    a = cases[0]
    ds = pydicom.dcmread(a.seg)
    pos = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
    pos.ImagePositionPatient = [float(pos.ImagePositionPatient[0]) + 0.5] + list(pos.ImagePositionPatient[1:])   # half a pixel
    with pytest.raises(VolumeMaskError, match='not on a slice'): seg_to_volume(ds, load_series(a.folder, decode=False))

def test_rtstruct_inner_contour_is_a_hole(tmp_path, cases):
    a = cases[0]
    t = a.truth
    centre = t.positions[len(t.positions)//2] + (t.size-1)/2*np.array(t.spacing[1:]).mean()*(t.orientation[:3] + t.orientation[3:])
    outer, inner = sphere_contours(t, centre, 9.), sphere_contours(t, centre, 4.)
    fn = synth_rtstruct(tmp_path/'ring.dcm', a.files, {'ring': outer + inner})
    lab, names = rtstruct_to_volume(fn, load_series(a.folder, decode=False))
    k = len(t.positions)//2
    p = t.lps(k)
    d = np.linalg.norm(p - centre, axis=-1)
    truth = (d <= 9.) & (d > 4.)
    assert names == ['background', 'ring'] and _iou(lab[k] == 1, truth) >= 0.85 and not lab[k][d < 3].any()

def test_volume_block_equals_load_series_and_item_transforms(cases):
    "VolumeBlock batch values = load_series + ResampleVolume + centre CropPadVolume, computed by hand."
    df = pd.DataFrame([dict(fnames=[str(f) for f in c.files], PatientID=c.patient_id, label=c.label) for c in cases])
    db = DataBlock(blocks=(VolumeBlock(), CategoryBlock), get_x=lambda r: r, get_y=ColReader('label'),
                   splitter=PatientSplitter(valid_pct=0.5, seed=0),
                   item_tfms=[ResampleVolume((1.5, 1.5, 1.5)), CropPadVolume((16, 24, 24))])
    dls = db.dataloaders(df, bs=2, shuffle=False)
    xb, yb = dls.valid.one_batch()
    assert isinstance(xb, TensorVolume) and xb.shape == (2, 1, 16, 24, 24) and xb.dtype == torch.float32
    for i, pid in enumerate(dls.valid.items.PatientID):
        vol = resample(load_series([f for c in cases if c.patient_id == pid for f in c.files]), (1.5, 1.5, 1.5))
        D, H, W = vol.shape
        s = [(n - m)//2 for n, m in zip(vol.shape, (16, 24, 24))]
        want = np.full((16, 24, 24), vol.array.min(), np.float32)
        src = vol.array[max(s[0], 0):s[0]+16, max(s[1], 0):s[1]+24, max(s[2], 0):s[2]+24]
        want[max(-s[0], 0):max(-s[0], 0)+src.shape[0], max(-s[1], 0):max(-s[1], 0)+src.shape[1], max(-s[2], 0):max(-s[2], 0)+src.shape[2]] = src
        np.testing.assert_array_equal(xb[i, 0].cpu().numpy(), want)
    assert xb.spacing == (1.5, 1.5, 1.5)

def test_volume_block_opens_enhanced_multiframe_and_rows(tmp_path):
    fn = synth_dicom(tmp_path/'enh.dcm', enhanced=True, frames=5, size=24, seed=3)
    fn = fn[0] if isinstance(fn, tuple) else fn
    x = open_volume(fn)
    assert x.shape == (1, 5, 24, 24)
    np.testing.assert_array_equal(x[0].numpy(), load_series(fn).array)
    with pytest.raises(DicomError, match="'fnames' column"): OpenVolume()(pd.Series(dict(fname=str(fn))))

def test_augmentation_identical_geometry_for_image_and_mask(cases):
    "Random flips/rotations/zooms: the truth as an image (trilinear), thresholded, is the transformed mask (nearest): IoU."
    xs = torch.stack([open_volume(c.folder) for c in cases[:3]])
    body = (xs[:, 0] > -500).long()                              # the body: a large asymmetric object
    ms = TensorMask3D(body, spacing=(1., 1., 1.))
    img = TensorVolume(body[:, None].float(), spacing=(1., 1., 1.))
    aff = VolumeAffine(p_flip=0.5, max_rotate=20., max_scale=0.15, p_affine=1.)
    moved = 0
    for _ in range(3):
        ia, ma = aff((img, ms), split_idx=0)
        assert isinstance(ma, TensorMask3D) and ma.dtype == torch.int64
        for i in range(len(ms)):
            assert _iou((ia[i, 0] > 0.5).numpy(), (ma[i] == 1).numpy()) > 0.95
            moved += _iou(ma[i].numpy(), ms[i].numpy()) < 0.95
    assert moved >= 7
    ia, ma = aff((img, ms), split_idx=1)                          # validation: untouched
    assert torch.equal(ma, ms) and torch.equal(ia, img)

def test_affine_grid_is_torchs_and_all_moved_batch_samples_whole():
    "VolumeAffine builds F.affine_grid's grid by broadcasting (any shape, unit axes too) and, when every item moves, samples the batch as one."
    import torch.nn.functional as F
    from fastdcm.volume_data import _affine_grid
    for shape in [(6, 9, 11), (1, 5, 7), (4, 1, 3)]:
        th = volume_affines(3, shape, p_affine=1.)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')           # torch warns on unit-size grids; the values are what we compare
            ref = F.affine_grid(th, (3, 1, *shape), align_corners=True)
        got = _affine_grid(th, shape)
        assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-6)
    torch.manual_seed(1)
    x = TensorVolume(torch.randn(3, 1, 6, 9, 11), spacing=(1., 1., 1.))
    aff = VolumeAffine(p_flip=0., p_affine=1.)
    y = aff(x, split_idx=0)
    ref = F.grid_sample(x.as_subclass(torch.Tensor), F.affine_grid(aff.theta, (3, 1, 6, 9, 11), align_corners=True),
                        mode='bilinear', padding_mode='border', align_corners=True)
    assert torch.allclose(y.as_subclass(torch.Tensor), ref, atol=1e-5)

def test_crop_around_mask_keeps_foreground_and_origin(cases):
    c = cases[0]
    x, m = open_volume(c.folder), open_volume_mask(c.seg, c.folder)
    crop = CropPadVolume(12, method='mask', p_foreground=1.)
    grid = load_series(c.folder, decode=False)
    for _ in range(5):
        xc, mc = crop((x, m), split_idx=0)
        assert mc.sum() > 0 and xc.shape == (1, 12, 12, 12)
        np.testing.assert_allclose(xc.origin, grid.lps(crop.starts))

# ---- learners (MONAI networks: the `3d` extra)

@pytest.fixture(scope='module')
def seg_dls(cases):
    df = pd.DataFrame([dict(fnames=[str(f) for f in c.files], PatientID=c.patient_id, label=c.label, mask=str(c.seg or c.rtstruct))
                       for c in cases])
    db = DataBlock(blocks=(VolumeBlock(), VolumeMaskBlock(codes=['background', 'nodule'])), get_x=lambda r: r,
                   splitter=PatientSplitter(valid_pct=0.25, seed=0), item_tfms=CropPadVolume(16, method='mask'),
                   batch_tfms=[*aug_volume_transforms(), VolumeWindow('soft_tissue')])
    return db.dataloaders(df, bs=2)

def test_unet_fits_and_predicts_mask_on_series_grid(seg_dls, cases):
    "One epoch of a 3-D U-Net, then predict on a whole series folder (bigger than the patch: sliding windows, flip TTA)."
    pytest.importorskip('monai')
    from fastdcm.volume_learner import volume_unet_learner, DiceCELoss3D
    learn = volume_unet_learner(seg_dls, channels=(8, 16))
    assert isinstance(learn.loss_func, DiceCELoss3D)
    learn.fit(1, 1e-2)
    assert np.isfinite(learn.recorder.values[-1]).all()
    c = cases[0]
    mask, _, prob = learn.predict(c.folder, tta=True)
    grid = load_series(c.folder, decode=False)
    assert isinstance(mask, TensorMask3D) and tuple(mask.shape) == grid.shape and prob.shape == (2, *grid.shape)
    np.testing.assert_allclose(mask.origin, grid.origin); assert mask.codes == ['background', 'nodule']
    torch.testing.assert_close(prob.sum(0), torch.ones(grid.shape), atol=1e-4, rtol=0)

def test_predict_resamples_back_to_series_grid(cases):
    "Trained at 2 mm, predicted on a 1 mm series: the mask comes back on the series' 1 mm grid."
    pytest.importorskip('monai')
    from fastdcm.volume_learner import volume_unet_learner
    df = pd.DataFrame([dict(fnames=[str(f) for f in c.files], PatientID=c.patient_id, mask=str(c.rtstruct)) for c in cases])
    db = DataBlock(blocks=(VolumeBlock(), VolumeMaskBlock(codes=['background', 'nodule'])), get_x=lambda r: r,
                   splitter=PatientSplitter(valid_pct=0.25, seed=0), item_tfms=[ResampleVolume((2., 2., 2.)), CropPadVolume(8)],
                   batch_tfms=VolumeWindow('soft_tissue'))
    learn = volume_unet_learner(db.dataloaders(df, bs=2), channels=(4, 8))
    mask, _, prob = learn.predict(cases[1].folder)
    assert tuple(mask.shape) == (32, 32, 32) and mask.spacing == (1., 1., 1.)

def test_classifier_fits_and_predicts_label(cases):
    pytest.importorskip('monai')
    from fastai.metrics import accuracy
    from fastdcm.volume_learner import volume_learner
    df = pd.DataFrame([dict(fnames=[str(f) for f in c.files], PatientID=c.patient_id, label=c.label) for c in cases])
    db = DataBlock(blocks=(VolumeBlock(), CategoryBlock), get_x=lambda r: r, get_y=ColReader('label'),
                   splitter=PatientSplitter(valid_pct=0.25, seed=0), item_tfms=CropPadVolume(16),
                   batch_tfms=[*aug_volume_transforms(), VolumeWindow('soft_tissue')])
    learn = volume_learner(db.dataloaders(df, bs=2), 'resnet10', metrics=accuracy)
    learn.fit(1, 1e-3)
    label, idx, probs = learn.predict(cases[3].folder, tta=True)
    assert label in ('nodule', 'none') and probs.shape == (2,) and abs(float(probs.sum()) - 1) < 1e-4

def test_window_on_volume_batches(cases):
    "fastdcm.augment.Window on a 5-D VolumeBlock batch: one channel per window, the same values as VolumeWindow, type and geometry kept."
    from fastdcm.augment import Window
    xb = torch.stack([open_volume(c.folder) for c in cases[:2]])
    w = Window(['soft_tissue', 'lungs'])(xb, split_idx=1)
    assert isinstance(w, TensorVolume) and w.shape == (2, 2, 32, 32, 32) and w.spacing == xb.spacing
    torch.testing.assert_close(w[:, :1].as_subclass(torch.Tensor), VolumeWindow('soft_tissue')(xb, split_idx=1).as_subclass(torch.Tensor))
    torch.testing.assert_close(w[:, 1:].as_subclass(torch.Tensor), VolumeWindow('lungs')(xb, split_idx=1).as_subclass(torch.Tensor))

def test_regression_learner_predicts_a_number(tmp_path):
    "3-D regression (the nodule's radius): RegressionBlock target, one output, predict on a folder gives that number."
    pytest.importorskip('monai')
    from fastai.data.all import RegressionBlock
    from fastdcm.volume_learner import volume_learner
    cs = [synth_nodule_series(tmp_path/f'R{i}', seed=60+i, patient_id=f'R{i}', seg=False, rtstruct=False, n_slices=16, size=16,
                              radius=(2., 4.)) for i in range(4)]
    df = pd.DataFrame([dict(fnames=[str(f) for f in c.files], PatientID=c.patient_id, radius=float(c.truth.nodules[0][1])) for c in cs])
    db = DataBlock(blocks=(VolumeBlock(), RegressionBlock), get_x=lambda r: r, get_y=ColReader('radius'),
                   splitter=PatientSplitter(valid_pct=0.25, seed=0), batch_tfms=VolumeWindow())
    learn = volume_learner(db.dataloaders(df, bs=2), 'resnet10', net_kwargs=dict(widths=(8, 16, 32, 64), norm='instance'))
    learn.fit(1, 1e-3)
    out, idx, raw = learn.predict(cs[0].folder, tta=True)
    assert idx is None and out.shape == (1,) and torch.isfinite(out).all()

def test_volume_learners_channels_last_on_cpu(cases):
    "On CPU DataLoaders both 3-D learners train with `channels_last_3d` weights (`ChannelsLast3d`); `channels_last=False` keeps the default layout; the outputs agree to float rounding; a GPU gets it only when asked."
    pytest.importorskip('monai')
    from types import SimpleNamespace
    from fastdcm.volume_learner import volume_learner, volume_unet_learner, ChannelsLast3d, _layout_cbs
    has = lambda l: len(l.cbs.filter(lambda c: isinstance(c, ChannelsLast3d)))
    df = pd.DataFrame([dict(fnames=[str(f) for f in c.files], PatientID=c.patient_id, label=c.label) for c in cases])
    db = DataBlock(blocks=(VolumeBlock(), CategoryBlock), get_x=lambda r: r, get_y=ColReader('label'),
                   splitter=PatientSplitter(valid_pct=0.25, seed=0), item_tfms=CropPadVolume(16), batch_tfms=VolumeWindow('soft_tissue'))
    dls = db.dataloaders(df, bs=2)
    learn = volume_learner(dls, 'resnet10')
    assert has(learn) == 1
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    convs = [m.weight for m in learn.model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in convs)
    assert not all(w.is_contiguous() for w in convs)
    plain = volume_learner(dls, 'resnet10', channels_last=False)
    assert has(plain) == 0
    plain.model.load_state_dict(learn.model.state_dict()); plain.model.eval(); learn.model.eval()
    xb = dls.valid.one_batch()[0].as_subclass(torch.Tensor)
    with torch.no_grad(): torch.testing.assert_close(plain.model(xb), learn.model(xb), rtol=1e-4, atol=1e-4)
    assert has(volume_unet_learner(dls, channels=(4, 8), n_out=2)) == 1
    assert has(volume_unet_learner(dls, channels=(4, 8), n_out=2, channels_last=False)) == 0
    gpu = SimpleNamespace(device=torch.device('cuda', 0))
    assert _layout_cbs(None, gpu, None) is None and len(_layout_cbs(None, gpu, True)) == 1
