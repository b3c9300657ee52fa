"fastdcm.learner: channel inference, normalisation, 1-epoch fit, predict on a .dcm path, tta, segmentation, run_demo."
import time, warnings
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
import matplotlib
matplotlib.use('Agg')
from fastai.vision.all import (resnet18, accuracy, Normalize, DataBlock, MaskBlock, ColReader, imagenet_stats,
                               PILMask, TensorMask, Dice)
import fastai.vision.learner as fv
from fastdcm.synth import synth_study_set
from fastdcm.transforms import DicomBlock, DicomResize, TensorDicom, open_dicom
from fastdcm.augment import dicom_aug_transforms
from fastdcm.data import DicomDataLoaders, DicomColReader, PatientSplitter
from fastdcm.learner import (vision_learner, unet_learner, run_demo, data_norm_stats, pretrained_norm_stats,
                             RecalibrateBN)

@pytest.fixture(scope='module')
def study(tmp_path_factory):
    return synth_study_set(tmp_path_factory.mktemp('study'), n_patients=8, images_per_patient=3, size=64, seed=1)

def _norm(dls): return [t for t in dls.after_batch.fs if isinstance(t, Normalize)]

def test_fit_predict_tta_with_windows(study):
    dls = DicomDataLoaders.from_df(study, seed=0, bs=8, windows=['auto', (40, 400), 'bone'],
                                   item_tfms=DicomResize(64), num_workers=0)
    learn = vision_learner(dls, resnet18, pretrained=False, metrics=accuracy)
    first = learn.model[0][0]
    assert isinstance(first, torch.nn.Conv2d) and first.in_channels == 3       # one channel per window
    (norm,) = _norm(dls)
    x = dls.one_batch()[0]
    assert x.shape[1] == 3 and float(x.mean(dim=(0, 2, 3)).abs().max()) < 1.5  # roughly centred by the data stats
    assert len(learn.cbs.filter(lambda c: isinstance(c, RecalibrateBN))) == 1  # from scratch: BN recalibrated
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-3)
    assert np.isfinite(learn.recorder.values[-1]).all()
    fn = study.fname.iloc[0]
    bn = learn.model[0][1]
    before = bn.running_mean.clone(), bn.running_var.clone()
    learn.predict(fn); learn.get_preds()                        # outside fit: BN statistics untouched
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    label, idx, probs = learn.predict(fn)                       # a .dcm path as str
    assert label in dls.vocab and dls.vocab[int(idx)] == label
    assert probs.shape == (2,) and abs(float(probs.sum()) - 1) < 1e-5
    assert learn.predict(Path(fn))[0] in dls.vocab               # and as a Path
    preds, targs = learn.tta(n=2)
    assert preds.shape == (len(dls.valid_ds), 2) and len(targs) == len(dls.valid_ds)

def test_export_and_load_learner_predict_the_same(study, tmp_path):
    from fastai.learner import load_learner
    dls = DicomDataLoaders.from_df(study, seed=0, bs=8, windows=['auto'], item_tfms=DicomResize(64), num_workers=0)
    learn = vision_learner(dls, resnet18, pretrained=False, path=tmp_path)
    learn.export('model.pkl')
    loaded = load_learner(tmp_path/'model.pkl')
    fn = study.fname.iloc[1]
    a, b = learn.predict(fn), loaded.predict(fn)
    assert a[0] == b[0] and torch.allclose(a[2], b[2], atol=1e-6)

def test_one_channel_from_scratch_normalises_with_data_stats(study):
    dls = DicomDataLoaders.from_df(study, seed=0, bs=8, item_tfms=DicomResize(64), num_workers=0)
    raw = dls.one_batch()[0]
    learn = vision_learner(dls, resnet18, pretrained=False)
    assert learn.model[0][0].in_channels == 1
    (norm,) = _norm(dls)
    # modality values (HU-like, far from [0,1]) end up centred with unit spread
    assert abs(float(raw.mean())) > 1 or float(raw.std()) > 1
    # the stats pool distinct training batches (here the whole training set), not one random batch
    xs = torch.cat([b[0] for b in dls.train.new(shuffle=False, drop_last=False)])
    assert abs(float(xs.mean())) < 0.05 and abs(float(xs.std()) - 1) < 0.05
    raw_all = torch.cat([b[0] for b in dls.train.new(shuffle=False, drop_last=False,
                                                      after_batch=[t for t in dls.after_batch.fs if t is not norm])])
    np.testing.assert_allclose(norm.mean.flatten().cpu().numpy(), [float(raw_all.mean())], rtol=1e-4)
    np.testing.assert_allclose(norm.std.flatten().cpu().numpy(), [float(raw_all.std())], rtol=1e-4)
    vision_learner(dls, resnet18, pretrained=False)              # a second learner doesn't stack a second Normalize
    assert len(_norm(dls)) == 1

def test_explicit_n_in_and_stats_helpers(study):
    dls = DicomDataLoaders.from_df(study, seed=0, bs=8, windows=['auto'], item_tfms=DicomResize(64), num_workers=0)
    m, s = data_norm_stats(dls, n_batches=2)
    assert len(m) == 1 and 0 <= m[0] <= 1 and s[0] > 0
    assert pretrained_norm_stats(1) == ([float(np.mean(imagenet_stats[0]))], [float(np.mean(imagenet_stats[1]))])
    assert pretrained_norm_stats(4)[0][:3] == list(imagenet_stats[0])

def test_pretrained_path_uses_imagenet_stats(study, monkeypatch):
    "pretrained=True (weights can't be downloaded here: the model is built without them) gets ImageNet stats."
    orig = fv.create_vision_model
    monkeypatch.setattr(fv, 'create_vision_model', lambda *a, **k: orig(*a, **{**k, 'pretrained': False}))
    dls = DicomDataLoaders.from_df(study, seed=0, bs=8, windows=['auto', 'brain', 'bone'], item_tfms=DicomResize(64),
                                   num_workers=0)
    learn = vision_learner(dls, resnet18, pretrained=True)
    assert not learn.cbs.filter(lambda c: isinstance(c, RecalibrateBN))
    (norm,) = _norm(dls)
    np.testing.assert_allclose(norm.mean.flatten().cpu().numpy(), imagenet_stats[0], rtol=1e-5)
    np.testing.assert_allclose(norm.std.flatten().cpu().numpy(), imagenet_stats[1], rtol=1e-5)
    assert not all(p.requires_grad for p in learn.model[0].parameters())     # frozen body, as fastai does
    # modality values into a pretrained model: warned
    dls1 = DicomDataLoaders.from_df(study, seed=0, bs=8, item_tfms=DicomResize(64), num_workers=0)
    with pytest.warns(UserWarning, match=r'expect \[0,1\] images'):
        learn1 = vision_learner(dls1, resnet18, pretrained=True)
    (norm1,) = _norm(dls1)
    np.testing.assert_allclose(norm1.mean.flatten().cpu().numpy(), [np.mean(imagenet_stats[0])], rtol=1e-5)

def test_recalibrate_bn_matches_training_statistics():
    "After recalibration, a BatchNorm's running stats are the plain average of the batch stats it saw."
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    torch.manual_seed(0)
    xs = torch.randn(32, 3) * 5 + 7
    ds = [(x, torch.tensor(0.)) for x in xs]
    dls = DataLoaders(DataLoader(ds, bs=8), DataLoader(ds, bs=8))
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    learn = Learner(dls, model, loss_func=lambda p, y: p.sum() * 0, cbs=RecalibrateBN(n_batches=4))
    learn.recalibrate_bn.recalibrate()
    np.testing.assert_allclose(model[0].running_mean.numpy(), xs.mean(0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(model[0].running_var.numpy(), np.mean([b.var(0, unbiased=True).numpy()
                               for b in xs.split(8)], 0), rtol=1e-4)
    assert model[0].momentum == 0.1

def _disc_set(tmp_path, n=8, size=64):
    "DICOMs with a bright disc (HU ~ 300 on ~0) and PNG masks of exactly that disc."
    from fastdcm.synth import synth_dicom
    rng = np.random.default_rng(0); rows = []
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx = rng.integers(18, size - 18, 2); r = rng.integers(8, 14)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img = np.where(disc, 0.8, 0.2).astype(np.float32)
        fn = synth_dicom(tmp_path/f'seg{i}.dcm', image=img, modality='CT', photometric='MONOCHROME2', bits_stored=12,
                         signed=False, slope=1., intercept=-1024., patient_id=f'S{i}', size=size)
        vals = open_dicom(fn)[0].numpy()
        mask = (vals > (vals.min() + vals.max()) / 2).astype(np.uint8)
        assert abs(int(mask.sum()) - int(disc.sum())) <= 0.02 * disc.sum() + 5
        PILMask.create(mask).save(tmp_path/f'seg{i}.png')
        rows.append(dict(fname=str(fn), mask=str(tmp_path/f'seg{i}.png'), PatientID=f'S{i}'))
    return pd.DataFrame(rows)

def test_segmentation_aug_aligned_and_unet_fits(tmp_path):
    df = _disc_set(tmp_path)
    dblock = DataBlock(blocks=(DicomBlock(), MaskBlock(codes=['bg', 'disc'])), get_x=DicomColReader('fname'),
                       get_y=ColReader('mask'), splitter=PatientSplitter(0.25, seed=0),
                       batch_tfms=dicom_aug_transforms(max_rotate=30., max_zoom=1.3, p_affine=1., max_lighting=0.))
    dls = dblock.dataloaders(df, bs=6, num_workers=0)
    x, m = dls.one_batch()                                     # training batch: augmented
    assert type(x) is TensorDicom and isinstance(m, TensorMask) and x.shape[-2:] == m.shape[-2:]
    xs = x[:, 0].cpu().as_subclass(torch.Tensor)
    lo, hi = xs.amin(dim=(1, 2), keepdim=True), xs.amax(dim=(1, 2), keepdim=True)
    bright = xs > (lo + hi) / 2
    mk = m.cpu().as_subclass(torch.Tensor).bool()
    agree = (bright == mk).float().mean()
    assert agree > 0.95, f'image and mask moved differently ({agree:.3f} agreement)'
    # agreement alone forgives a few degrees of misalignment (background dominates): IoU of the disc doesn't
    iou = ((bright & mk).sum(dim=(1, 2)).float() / (bright | mk).sum(dim=(1, 2)).clamp(min=1)).min()
    assert iou > 0.85, f'image and mask moved differently (IoU {iou:.3f})'
    learn = unet_learner(dls, resnet18, pretrained=False, metrics=Dice())
    assert learn.model[0][0].in_channels == 1
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert np.isfinite(learn.recorder.values[-1]).all()
    preds, _ = learn.get_preds()
    assert preds.shape[1:] == (2, 64, 64)

def test_run_demo_learns(tmp_path):
    "The demo with its defaults reaches >= 0.9 validation accuracy on its patient split and writes its pictures."
    res = run_demo(tmp_path/'demo', verbose=False)
    assert res['accuracy'] >= 0.9, res
    assert res['n_leaking_patients'] == 0 and res['n_valid'] > 0
    for png in ('show_batch.png', 'show_results.png', 'confusion_matrix.png'):
        assert (tmp_path/'demo'/png).stat().st_size > 1000
    assert (tmp_path/'demo'/'labels.csv').exists()

def test_run_demo_too_few_patients_says_so(tmp_path):
    "Too small a study set for one batch is a clear error, not fastai's 'no batches' deep in fit."
    with pytest.raises(ValueError, match='too few for batches'):
        run_demo(tmp_path/'demo', n_patients=4, images_per_patient=2, epochs=1, bs=16, verbose=False)

class _Counted:
    "A dataset of (x, 0.) pairs that counts the items fetched from it."
    def __init__(self, xs): self.xs, self.fetched = xs, 0
    def __len__(self): return len(self.xs)
    def __getitem__(self, i): self.fetched += 1; return self.xs[i], torch.tensor(0.)

def _bn_learner(xs, n_batches, shuffle=False, bs=8, max_frac=1.):
    "A Learner on a single BatchNorm (zero loss: the weights never move) with `RecalibrateBN(n_batches, max_frac)`."
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    trn = _Counted(xs)
    dls = DataLoaders(DataLoader(trn, bs=bs, shuffle=shuffle), DataLoader(_Counted(xs[:bs]), bs=bs))
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(xs.shape[1]))
    return Learner(dls, model, loss_func=lambda p, y: p.sum() * 0, cbs=RecalibrateBN(n_batches=n_batches, max_frac=max_frac)), trn

def test_recalibrate_bn_in_fit_reuses_the_last_training_inputs():
    "In `fit`, the statistics are re-estimated on the inputs of the epoch's last `n_batches` training batches: no item is loaded twice."
    torch.manual_seed(0)
    xs = torch.randn(32, 3) * 5 + torch.arange(32.)[:, None]   # each batch of 8 has its own mean: which batches count shows
    learn, trn = _bn_learner(xs, n_batches=2)
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    assert trn.fetched == 32                                    # one pass over the training set, nothing decoded again
    bn = learn.model[0]
    np.testing.assert_allclose(bn.running_mean.numpy(), xs[16:].mean(0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(bn.running_var.numpy(), np.mean([b.var(0).numpy() for b in xs[16:].split(8)], 0), rtol=1e-4)
    assert bn.momentum == 0.1 and learn.recalibrate_bn.kept == []   # restored; no batch held after fit

def test_recalibrate_bn_leaves_training_unchanged():
    "With or without `RecalibrateBN`, training draws the same batches: the callback changes only what validation sees."
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.torch_core import set_seed
    torch.manual_seed(0)
    xs, ys = torch.randn(48, 4), torch.randint(0, 2, (48,))
    def fit(cbs):
        set_seed(1)
        dls = DataLoaders(DataLoader(list(zip(xs, ys)), bs=8, shuffle=True, drop_last=True), DataLoader(list(zip(xs, ys)), bs=8))
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
        learn = Learner(dls, model, loss_func=torch.nn.CrossEntropyLoss(), lr=0.1, cbs=cbs)
        with learn.no_bar(), learn.no_logging(): learn.fit(3)
        return [p.detach().clone() for p in model.parameters()]
    for a, b in zip(fit([]), fit([RecalibrateBN(n_batches=2)])): assert torch.equal(a, b)

def test_recalibrate_bn_spares_frozen_batchnorm():
    "BatchNorm layers kept in eval mode while training (fastai's `BnFreeze`) keep their running statistics."
    from fastai.callback.training import BnFreeze
    torch.manual_seed(0)
    xs = torch.randn(32, 3) * 5 + 7
    learn, _ = _bn_learner(xs, n_batches=2)
    bn = learn.model[0]
    bn.running_mean.fill_(1.); bn.running_var.fill_(2.)
    bn.requires_grad_(False)                                            # a frozen layer, as in a frozen pretrained body
    learn.add_cb(BnFreeze())
    learn.model = torch.nn.Sequential(torch.nn.Linear(3, 3), bn)      # BnFreeze freezes BN below a trainable layer
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    assert torch.equal(bn.running_mean, torch.ones(3)) and torch.equal(bn.running_var, torch.full((3,), 2.))

def test_recalibrate_bn_takes_at_most_max_frac_of_the_epoch():
    "On a short epoch the re-estimate uses at most `max_frac` of its training batches (default a quarter: here 1 of 4)."
    torch.manual_seed(0)
    xs = torch.randn(32, 3) * 5 + torch.arange(32.)[:, None]
    for max_frac, first in ((0.25, 24), (0.5, 16), (0.01, 24)):
        learn, _ = _bn_learner(xs, n_batches=4, max_frac=max_frac)
        with learn.no_bar(), learn.no_logging(): learn.fit(1)
        np.testing.assert_allclose(learn.model[0].running_mean.numpy(), xs[first:].mean(0).numpy(), rtol=1e-5)

def test_channels_last_on_cpu_by_default(study):
    "On CPU DICOM DataLoaders both learners train channels-last (fastai's `ChannelsLast`, no mixed precision); `channels_last=False/True` decides; fastai's own learners on other data are untouched; the layout changes no value beyond float rounding."
    from fastai.callback.channelslast import ChannelsLast
    from fastai.callback.fp16 import MixedPrecision
    has = lambda l, cls: len(l.cbs.filter(lambda c: isinstance(c, cls)))
    dls = DicomDataLoaders.from_df(study, seed=0, bs=8, windows=['auto', 'bone'], item_tfms=DicomResize(64), num_workers=0)
    assert torch.device(dls.device).type == 'cpu'
    learn = vision_learner(dls, resnet18, pretrained=False)
    assert has(learn, ChannelsLast) == 1 and has(learn, MixedPrecision) == 0
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    w = learn.model[0][0].weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    plain = vision_learner(dls, resnet18, pretrained=False, channels_last=False)
    assert has(plain, ChannelsLast) == 0
    plain.model.load_state_dict(learn.model.state_dict())
    xb = dls.one_batch()[0].as_subclass(torch.Tensor)
    learn.model.eval(); plain.model.eval()
    with torch.no_grad(): torch.testing.assert_close(learn.model(xb), plain.model(xb), rtol=1e-4, atol=1e-4)
    assert has(unet_learner(dls, resnet18, pretrained=False, n_out=2), ChannelsLast) == 1
    assert has(unet_learner(dls, resnet18, pretrained=False, n_out=2, channels_last=False), ChannelsLast) == 0
    from types import SimpleNamespace
    from fastdcm.learner import _layout_cbs                            # DataLoaders on a GPU: off unless asked
    gpu = SimpleNamespace(device=torch.device('cuda', 0))
    assert _layout_cbs(None, gpu, None) is None and len(_layout_cbs(None, gpu, True)) == 1
