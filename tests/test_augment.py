"""Tests for fastdcm.augment: windows vs the PS3.3 formula, RandomWindow on training only, masks untouched and aligned,
no [0,1] clamp before windowing, full-depth equalisation, device-agnostic (cpu, and cuda when present)."""
import warnings
import numpy as np, pandas as pd, pytest, torch
from pydicom.data import get_testdata_file
from fastai.vision.all import (DataBlock, CategoryBlock, MaskBlock, ColReader, RandomSplitter, TensorMask, TensorPoint,
                               PILMask, Pipeline, Brightness, Contrast)
from fastdcm.transforms import TensorDicom, open_dicom, DicomBlock, DicomResize
from fastdcm.augment import *
from fastdcm.transforms import plane_percentiles
from fastdcm.augment import _hist_eq

CT = get_testdata_file('CT_small.dcm')
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])

def linear(x, c, w):
    "PS3.3 C.11.2.1.2.1 LINEAR, output [0,1], written from the standard."
    x = np.asarray(x, np.float64)
    y = (x - (c - 0.5)) / (w - 1) + 0.5
    y = np.where(x <= c - 0.5 - (w-1)/2, 0., y)
    return np.where(x > c - 0.5 + (w-1)/2, 1., y)

@pytest.fixture
def batch():
    ct = open_dicom(CT)
    return TensorDicom(torch.stack([ct, ct.flip(-1), ct.transpose(-1,-2), ct*0.5]))

@pytest.mark.parametrize('device', DEVICES)
def test_three_windows_equal_formula(batch, device):
    rng = np.random.default_rng(0)
    wins = ['lungs', (float(rng.uniform(-100, 300)), float(rng.uniform(1, 600))), 'bone']
    out = Window(wins)(batch.to(device))
    assert out.device.type == device and type(out) is TensorDicom and out.shape == (4,3,128,128)
    specs = [dicom_windows['lungs'], wins[1], dicom_windows['bone']]
    x = batch[:,0].numpy()
    for i,(c,w) in enumerate(specs):
        np.testing.assert_allclose(out[:,i].cpu().numpy(), linear(x, c, w), atol=1e-5)

def test_window_width_one_and_bad_specs():
    with pytest.raises(ValueError, match='>= 1'): Window([(0, 0.5)])
    with pytest.raises(ValueError, match='>= 1'): Window((0, 0.5))
    with pytest.raises(ValueError, match='unknown window'): Window('lung')
    x = TensorDicom(torch.tensor([[[-1., 0., 1.]]]))
    np.testing.assert_allclose(Window([(0.5, 2)])(x)[0,0].numpy(), linear([-1,0,1], 0.5, 2))
    np.testing.assert_allclose(Window([(0.5, 1)])(x)[0,0].numpy(), [0., 0., 1.])   # w = 1: a step at c - 0.5

def test_frames_as_channels_window_major():
    x = TensorDicom(torch.randn(2, 3, 8, 8)*500)
    out = Window(['brain','bone'])(x)
    assert out.shape == (2, 6, 8, 8)
    np.testing.assert_allclose(out[:,4].numpy(), linear(x[:,1].numpy(), *dicom_windows['bone']), atol=1e-5)

def test_auto_window_excludes_padding(batch):
    padded = batch.clone(); padded[:, :, :20] = -5000.
    a, b = Window('auto')(batch), Window('auto')(padded)
    torch.testing.assert_close(a[:, :, 20:], b[:, :, 20:], atol=0.03, rtol=0)
    assert b[:, :, :20].max() == 0
    # the window really spans the 0.5-99.5 percentiles of the image
    lo, hi = np.percentile(batch[0,0].numpy()[batch[0,0].numpy() > batch[0,0].numpy().min()], [0.5, 99.5])
    plo, phi = plane_percentiles(batch[:1], (0.5, 99.5))[0,0].tolist()
    assert abs(plo-lo) < 5 and abs(phi-hi) < 5

@pytest.mark.parametrize('device', DEVICES)
def test_random_window_only_in_training(batch, device):
    batch = batch.to(device)
    rw = RandomWindow(['brain', 'auto'], max_center=0.3, max_width=0.3)
    ref = Window(['brain', 'auto'])(batch)
    assert torch.equal(rw(batch, split_idx=1), ref)
    torch.manual_seed(0)
    tr = rw(batch, split_idx=0)
    assert tr.device.type == device and type(tr) is TensorDicom
    assert not torch.allclose(tr, ref)
    # per item: different items get different jitters
    d = (tr - ref).abs().flatten(1).mean(1)
    assert len(set(np.round(d.cpu().numpy(), 6))) > 1

def _seg_dls(tmp_path, batch_tfms, n=8):
    ct = open_dicom(CT)[0].numpy()
    rows = []
    for i in range(n):
        fn = tmp_path/f'c{i}.dcm'; fn.write_bytes(open(CT,'rb').read())
        PILMask.create((ct > 200).astype(np.uint8)).save(tmp_path/f'm{i}.png')
        rows.append(dict(fname=str(fn), mask=str(tmp_path/f'm{i}.png'), label='ab'[i%2]))
    db = DataBlock(blocks=(DicomBlock(), MaskBlock(['bg','bone'])), get_x=ColReader('fname'), get_y=ColReader('mask'),
                   splitter=RandomSplitter(0.25, seed=0), item_tfms=DicomResize(64), batch_tfms=batch_tfms)
    return db.dataloaders(pd.DataFrame(rows), bs=4, num_workers=0)

def test_random_window_in_dataloaders(tmp_path):
    dls = _seg_dls(tmp_path, [RandomWindow('soft_tissue', max_center=0.3, max_width=0.3)])
    torch.manual_seed(0)
    xt, _ = dls.train.one_batch()
    xv, _ = dls.valid.one_batch()
    raw = dls.valid.new(after_batch=[]).one_batch()[0]
    torch.testing.assert_close(xv, Window('soft_tissue')(raw))     # validation: the exact window
    rt = dls.train.new(after_batch=[], shuffle=False).one_batch()[0]
    assert xt.shape[1:] == xv.shape[1:] and xt.windows == ['soft_tissue']
    # all files hold the same image, so without jitter the training batch would equal the plain window
    assert not torch.allclose(xt, Window('soft_tissue')(rt))

def test_intensity_transforms_leave_masks_and_points(batch):
    m = TensorMask(torch.randint(0, 3, (4,128,128)))
    p = TensorPoint(torch.rand(4,5,2)*2-1)
    for t in [Window(['brain','auto','histeq']), RandomWindow('bone'), ModalityJitter(p=1.), ModalityNoise(p=1.),
              DicomHistEq(), DicomCLAHE()]:
        x2, m2, p2 = t((batch, m, p), split_idx=0)
        assert torch.equal(m2, m) and type(m2) is TensorMask and torch.equal(p2, p)
        assert not torch.equal(x2, batch)

def test_no_unit_clamp_before_windowing(batch):
    tfms = dicom_aug_transforms(max_lighting=0.5, p_lighting=1., p_intensity=1., p_affine=1.)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        out = Pipeline(tfms, split_idx=0)(batch.clone())
    assert type(out) is TensorDicom
    assert out.max() > 1000 and out.min() < -500                     # still HU: nothing clamped to [0,1]
    # modality augmentations alone: small relative change, same range
    for t in [ModalityJitter(p=1.), ModalityNoise(p=1.)]:
        y = t(batch, split_idx=0)
        assert y.max() > 1000 and (y - batch).abs().mean() < 0.25*batch.std()

def test_lighting_after_window(batch):
    tfms = dicom_aug_transforms(['brain','bone'], max_lighting=0.5, p_lighting=1., max_noise=0, max_scale=0, max_shift=0)
    orders = [t.order for t in tfms]
    assert orders == sorted(orders)
    win = next(t for t in tfms if isinstance(t, RandomWindow))
    lit = next(t for t in tfms if isinstance(t, (Brightness, Contrast)))
    assert win.order < lit.order
    torch.manual_seed(0)
    out = Pipeline(tfms, split_idx=0)(batch.clone())
    assert out.shape == (4,2,128,128) and 0 <= out.min() and out.max() <= 1

def test_geometry_aligns_image_and_mask(tmp_path):
    torch.manual_seed(0)
    tfms = dicom_aug_transforms(['bone'], max_rotate=45, max_zoom=1.5, p_affine=1., max_lighting=0,
                                max_center=0, max_width=0, max_noise=0, max_scale=0, max_shift=0)
    dls = _seg_dls(tmp_path, tfms)
    x, m = dls.train.one_batch()
    assert type(x) is TensorDicom and type(m) is TensorMask
    raw_x, raw_m = dls.train.new(after_batch=[], shuffle=False).one_batch()
    assert not torch.equal(m, raw_m)                                  # the mask moved...
    # ...with the image: 'bone' pixels of the transformed image are the transformed mask
    bone = Window('bone')(DicomResize(64)(open_dicom(CT), split_idx=1)[None])
    thr = float(linear(np.array([200.]), *dicom_windows['bone'])[0])
    agree = ((x[:,0] > thr) == m.bool()).float().mean()
    assert agree > 0.95, agree
    # agreement is dominated by background (a 3-degree mask-only rotation still agrees at 0.95): IoU of the bone is
    # about 0.80 when aligned (bilinear image vs nearest mask at the edges) and 0.69 after a 3-degree slip
    xb, mb = x[:,0].as_subclass(torch.Tensor) > thr, m.as_subclass(torch.Tensor).bool()
    iou = (xb & mb).sum((1,2)).float() / (xb | mb).sum((1,2)).clamp(min=1)
    assert iou.min() > 0.74, iou

def test_hist_eq_full_depth():
    x = TensorDicom(torch.arange(1, 4097.).view(1,1,64,64) * 0.25)   # 4096 levels in a 1024-wide range
    y = DicomHistEq()(x)
    assert len(y.unique()) >= 4095                                    # 256-bin equalisation would give <= 256
    assert 0 <= y.min() and y.max() <= 1
    # padding (the minimum) -> 0 and excluded: adding a padding band doesn't change the rest
    xp = x.clone(); xp[..., :4, :] = -3000.
    yp = DicomHistEq()(xp)
    assert yp[..., :4, :].max() == 0
    assert yp[..., 4:, :].min() >= 0 and abs(float(yp[..., 4:, :].mean()) - 0.5) < 0.02

@pytest.mark.parametrize('device', DEVICES)
def test_device_agnostic(batch, device):
    xb = batch.to(device)
    m = TensorMask(torch.zeros(4,128,128, dtype=torch.long)).to(device)
    tfms = dicom_aug_transforms(['lungs','auto','histeq'], equalize='clahe', p_affine=1., p_intensity=1.)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        x, mm = Pipeline(tfms, split_idx=0)((xb, m))
    assert x.device.type == device and mm.device.type == device and x.shape == (4,3,128,128)
    for t in [DicomCLAHE(), DicomHistEq(), Window('auto')]:
        assert t(xb).device.type == device

from hypothesis import given, settings, example, strategies as st

@settings(max_examples=40, deadline=None)
@given(c=st.floats(-2000, 3000), w=st.floats(1.001, 5000), seed=st.integers(0, 2**16))
@example(c=1024.1433478863928, w=2.5, seed=0)  # a narrow window over large HU: float32 rounding, not a formula error
def test_window_formula_property(c, w, seed):
    g = torch.Generator().manual_seed(seed)
    x = TensorDicom(torch.randn(2, 1, 16, 16, generator=g)*1500 + c)
    out = Window([(c, w)])(x)
    # float32 rounding of x (|x| up to ~10^4) is magnified by the slope 1/(w-1): allow a few ulps of that, no more
    # (a formula error such as /w for /(w-1) or a 0.5 shift is orders of magnitude larger)
    tol = 4*np.finfo(np.float32).eps*(float(x.abs().max()) + abs(c) + 1)/(w - 1) + 2e-6
    np.testing.assert_allclose(out[:,0].numpy(), linear(x[:,0].numpy(), c, w), atol=tol)

def test_show_windows_from_the_module():
    "show_windows must work outside the notebook (its module imports what it draws with)."
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from fastdcm.augment import show_windows, Window
    x = TensorDicom(torch.linspace(-1000, 1000, 2*32*32).reshape(2, 1, 32, 32))
    n = len(plt.get_fignums())
    show_windows(Window(['brain', 'bone'])(x), max_n=2)
    assert len(plt.get_fignums()) == n + 1
    plt.close('all')

@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('align_corners', [True, False])
@pytest.mark.parametrize('size', [None, 96, 32])   # 32: more than 2x smaller, fastai shrinks the image first
@pytest.mark.parametrize('max_warp', [0., 0.4])
def test_projective_geometry_matches_fastai(batch, device, align_corners, size, max_warp):
    "TensorDicom's one-map geometry gives fastai's own result (same draws) for flip/rotate/zoom/warp, any size/corners."
    from functools import partial
    from fastai.vision.all import aug_transforms, TensorImage
    from fastai.vision.augment import compose_tfms
    b = batch.to(device)
    tf = aug_transforms(max_rotate=30, max_zoom=1.4, max_warp=max_warp, p_affine=1., max_lighting=0.,
                        align_corners=align_corners, size=size)[0]
    tf.before_call(b, split_idx=0)
    fn = partial(compose_tfms, tfms=tf.coord_fs)
    ours = b.affine_coord(tf.mat, fn, size, 'bilinear', tf.pad_mode, align_corners)
    theirs = TensorImage.affine_coord(b, tf.mat, fn, size, 'bilinear', tf.pad_mode, align_corners)
    assert ours.shape == theirs.shape == (4, 1, *((size, size) if size else (128, 128)))
    span = float(b.max() - b.min())
    err = (ours - theirs).abs()
    assert float(err.max()) < 1e-3*span and float(err.mean()) < 1e-6*span, (float(err.max()), span)
    if size is None: assert float((ours - b).abs().mean()) > 1                            # it did move the image

def test_projective_fit_and_fallback(batch):
    from fastai.vision.all import TensorImage
    H = torch.tensor([[1.1, 0.2, 0.05], [-0.1, 0.9, 0.], [0.15, -0.2, 1.]], dtype=torch.float64)[None].repeat(3, 1, 1)
    def persp(c):                                             # a projective map as fastai's coordinate functions see it
        hp = torch.cat([c, torch.ones_like(c[..., :1])], -1) @ H.float().transpose(1, 2)[:, None]
        return hp[..., :2] / hp[..., 2:]
    np.testing.assert_allclose(fit_projective(persp, 3).numpy(), H.numpy(), atol=1e-5)
    g = projective_grid(H, 5, 7)
    np.testing.assert_allclose(g.numpy(), persp(projective_grid(torch.eye(3, dtype=torch.float64)[None].repeat(3, 1, 1), 5, 7)).numpy(), atol=1e-5)
    ripple = lambda c: c + 0.05*torch.sin(6*c)                # not projective: fastai's path, exactly
    assert fit_projective(ripple, 4) is None
    mat = torch.eye(3)[None, :2].repeat(4, 1, 1); mat[:, 0, 2] = 0.1
    assert torch.equal(batch.affine_coord(mat, ripple), TensorImage.affine_coord(batch, mat, ripple))

def test_geometry_scratch_grid_reused_never_returned(batch):
    "On the CPU the sampling grid goes into one buffer kept between calls (a new 100+ MB block costs page faults each time); no image returned shares it."
    H = torch.eye(3, dtype=torch.float64)[None].repeat(2, 1, 1); H[:, 0, 1] = 0.2; H[:, 2, 0] = 0.1   # with perspective
    g = projective_grid(H, 48, 40, scratch=True)
    ptr, first = g.data_ptr(), g.clone()
    assert torch.equal(first, projective_grid(H, 48, 40))                  # the same values as a grid of its own
    H2 = H.clone(); H2[:, 0, 2] = 0.3
    assert projective_grid(H2, 48, 40, scratch=True).data_ptr() == ptr     # reused, overwritten
    mat = torch.eye(3)[None, :2].repeat(4, 1, 1)
    a = batch.affine_coord(mat + 0.1); keep = a.clone()
    b = batch.affine_coord(mat - 0.1)
    assert torch.equal(a, keep) and not torch.equal(a, b)                   # the second call left the first image alone
    assert a.data_ptr() != ptr and b.data_ptr() != ptr

def test_geometry_keeps_type_and_windows(batch):
    from fastai.vision.all import aug_transforms
    w = Window(['brain', 'bone'])(batch)
    out = aug_transforms(max_rotate=20, max_warp=0.3, p_affine=1., max_lighting=0.)[0](w, split_idx=0)
    assert type(out) is TensorDicom and out.windows == ['brain', 'bone'] and out.shape == w.shape

def test_window_on_volume_batches():
    "5-D batches (B, C, D, H, W): named windows per voxel, 'auto' from each volume's statistics (not per slice)."
    torch.manual_seed(0)
    vol = torch.randn(2, 1, 4, 8, 8) * 300 + torch.arange(4.).view(1, 1, 4, 1, 1) * 400   # slices of different ranges
    x = TensorDicom(vol)
    y = Window(['auto', 'lungs'])(x)
    assert y.shape == (2, 2, 4, 8, 8) and y.windows == ['auto', 'lungs']
    flat = Window('auto')(TensorDicom(vol.reshape(2, 1, 32, 8)))          # the same voxels laid out as one plane
    torch.testing.assert_close(y[:, :1].reshape(2, 1, 32, 8).as_subclass(torch.Tensor), flat.as_subclass(torch.Tensor))
    torch.testing.assert_close(y[:, 1:].as_subclass(torch.Tensor), torch.as_tensor(linear(vol.numpy(), -600, 1500), dtype=torch.float32))
    assert y[:, 0, 0].mean() < 0.35 and y[:, 0, 3].mean() > 0.65     # one window for the volume: slices keep their order
    inv = Window('auto')(TensorDicom(vol, inverted=(True, False)))
    torch.testing.assert_close(inv[0].as_subclass(torch.Tensor), 1 - y[0, :1].as_subclass(torch.Tensor))

def test_batch_buffers_reused_only_when_free(batch, monkeypatch):
    "On the CPU, Window and lighting write into buffers kept from earlier batches once nothing refers to them; a batch still held is never overwritten, and values equal those of fresh buffers."
    import fastdcm.augment as aug
    from fastai.vision.all import Pipeline, Brightness, Contrast
    pipe = Pipeline([Window(['brain', 'bone']), Brightness(0.4, p=1.), Contrast(0.4, p=1.)], split_idx=0)
    held = [aug._reusable((3, 5), torch.empty(0)) for _ in range(aug._MAX_REUSABLE)]   # batches someone keeps: a full pool
    kept = lambda: {t.data_ptr() for t in aug._scratch.reusable}
    torch.manual_seed(0); first = pipe(batch)
    keep, ptr, pool = first.clone(), first.data_ptr(), kept()
    assert ptr in pool
    torch.manual_seed(1); second = pipe(batch * 0.5)
    assert second.data_ptr() != ptr and torch.equal(first, keep)             # `first` is still held: left alone
    del first
    torch.manual_seed(0); third = pipe(batch)
    assert third.data_ptr() in pool and torch.equal(third, keep)            # free again: a kept buffer, same values
    arr = third.numpy()                                                       # numpy arrays count as users too
    used = third.data_ptr(); del third
    torch.manual_seed(1); assert pipe(batch).data_ptr() != used and np.array_equal(arr, keep.numpy())
    monkeypatch.setattr(aug, '_ALONE', None)                                  # no reuse: fresh buffers
    torch.manual_seed(0); fresh = pipe(batch)
    assert fresh.data_ptr() not in kept() and torch.equal(fresh, keep)
