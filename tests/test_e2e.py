"Acceptance: mixed synthetic DICOMs -> DicomDataLoaders -> batches equal to dicom_pixels / the PS3.3 LINEAR window."
import warnings
import numpy as np, pandas as pd, pytest, torch
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import pydicom
from fastdcm.pixels import dicom_pixels
from fastdcm.synth import synth_dicom
from fastdcm.transforms import TensorDicom, DicomResize
from fastdcm.data import DicomDataLoaders, check_leakage

SIZE = 48
# (modality, photometric, bits stored, signed, slope, intercept); slope None: the Rescale tags are removed
SPECS = [('CT', 'MONOCHROME2', 16, True, 1., -1024.),
         ('CR', 'MONOCHROME1', 12, False, 1., 0.),
         ('DX', 'MONOCHROME2', 8, False, None, None),
         ('CT', 'MONOCHROME1', 16, True, 2., -100.),
         ('MR', 'MONOCHROME2', 12, True, 0.5, 10.),
         ('DX', 'MONOCHROME1', 8, False, None, None),
         ('CR', 'MONOCHROME2', 16, False, 1., 0.),
         ('CT', 'MONOCHROME2', 12, True, 1., -1024.)]

def linear_by_hand(x, c, w):
    "PS3.3 C.11.2.1.2.1 LINEAR, output range [0,1], written from the standard's text."
    x = np.asarray(x, dtype=np.float64)
    y = (x - (c - 0.5)) / (w - 1) + 0.5
    y[x <= c - 0.5 - (w - 1) / 2] = 0.
    y[x > c - 0.5 + (w - 1) / 2] = 1.
    return y

@pytest.fixture(scope='module')
def df(tmp_path_factory):
    d = tmp_path_factory.mktemp('e2e')
    rows = []
    for i,(mod, pi, bits, signed, slope, icpt) in enumerate(SPECS * 2):
        pid = f'P{i % 6}'
        fn = synth_dicom(d/pid/f'im{i}.dcm', modality=mod, photometric=pi, bits_stored=bits, signed=signed,
                         slope=1. if slope is None else slope, intercept=0. if icpt is None else icpt, rescale=slope is not None,
                         patient_id=pid, size=SIZE, seed=i, finding=bool(i % 2))
        if slope is None:
            ds = pydicom.dcmread(fn)
            for kw in ('RescaleSlope', 'RescaleIntercept', 'RescaleType'):
                if kw in ds: delattr(ds, kw)
            ds.save_as(fn)
        rows.append(dict(fname=str(fn), PatientID=pid, label='finding' if i % 2 else 'normal', spec=i % len(SPECS)))
    return pd.DataFrame(rows)

def _files_are_mixed(df):
    hdr = [pydicom.dcmread(f, stop_before_pixels=True) for f in df.fname]
    assert {h.PhotometricInterpretation for h in hdr} == {'MONOCHROME1', 'MONOCHROME2'}
    assert {int(h.BitsStored) for h in hdr} == {8, 12, 16}
    assert {int(h.PixelRepresentation) for h in hdr} == {0, 1}
    assert any('RescaleSlope' not in h for h in hdr)
    assert {float(h.RescaleSlope) for h in hdr if 'RescaleSlope' in h} == {0.5, 1., 2.}

def _valid_batch(dls):
    "The whole validation set as one batch, in item order (no shuffle, no augmentation)."
    dl = dls.valid.new(bs=len(dls.valid_ds), shuffle=False, drop_last=False)
    return dl.one_batch(), dl.items

def _train_batch(dls):
    "The whole training set as one batch, in item order (files are SIZE x SIZE: the random crop is the identity)."
    dl = dls.train.new(bs=len(dls.train_ds), shuffle=False, drop_last=False)
    return dl.one_batch(), dl.items

def test_batch_equals_dicom_pixels(df):
    _files_are_mixed(df)
    dls = DicomDataLoaders.from_df(df, seed=0, bs=4, item_tfms=DicomResize(SIZE), num_workers=0)
    assert check_leakage(dls).empty
    x, y = dls.one_batch()
    assert type(x) is TensorDicom and x.dtype == torch.float32 and x.shape == (4, 1, SIZE, SIZE)
    checked = set()
    for (xv, yv), items in (_valid_batch(dls), _train_batch(dls)):   # every file, so every spec of SPECS
        assert len(items) >= 2 and type(xv) is TensorDicom
        for i, fn in enumerate(items.fname):
            ref = dicom_pixels(fn)                               # modality values, what the model should see
            np.testing.assert_allclose(xv[i, 0].cpu().numpy(), ref, rtol=1e-6, atol=1e-4)
        # and the label decodes back to the row's label
        assert [dls.vocab[int(o)] for o in yv] == list(items.label)
        checked |= set(items.spec)
    assert checked == set(range(len(SPECS)))

def test_windows_follow_ps33_linear(df):
    wins = ['brain', (40, 400), (300, 1500)]
    from fastdcm.augment import dicom_windows
    centers_widths = [dicom_windows['brain'], (40, 400), (300, 1500)]
    dls = DicomDataLoaders.from_df(df, seed=0, bs=4, windows=wins, item_tfms=DicomResize(SIZE), num_workers=0)
    (xv, _), items = _valid_batch(dls)
    assert type(xv) is TensorDicom and xv.shape == (len(items), 3, SIZE, SIZE)
    for i, fn in enumerate(items.fname):
        ref = dicom_pixels(fn)
        for k, (c, w) in enumerate(centers_widths):
            np.testing.assert_allclose(xv[i, k].cpu().numpy(), linear_by_hand(ref, c, w), atol=1e-5)

def test_show_batch_draws_a_figure(df):
    dls = DicomDataLoaders.from_df(df, seed=0, bs=4, windows=['auto'], item_tfms=DicomResize(SIZE), num_workers=0)
    plt.close('all')
    dls.show_batch(max_n=4, figsize=(6, 2))
    fig = plt.gcf()
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 4
    arr = shown[0].images[0].get_array()
    assert arr.shape[-2:] == (SIZE, SIZE) and float(np.ptp(arr)) > 0   # a real picture, not a blank
    plt.close('all')

def test_split_is_by_patient(df):
    for seed in range(5):
        dls = DicomDataLoaders.from_df(df, seed=seed, valid_pct=0.3, bs=4, item_tfms=DicomResize(SIZE), num_workers=0)
        assert not set(dls.train.items.PatientID) & set(dls.valid.items.PatientID)

def test_one_epoch_fit_and_predict_on_a_dcm_path(df):
    "Acceptance: a 1-epoch from-scratch fit on the mixed files runs well under a minute; predict takes a .dcm path."
    import time
    from fastai.vision.all import resnet18, accuracy
    from fastdcm.learner import vision_learner
    dls = DicomDataLoaders.from_df(df, seed=0, bs=4, windows=['auto', 'soft_tissue'], item_tfms=DicomResize(SIZE),
                                   num_workers=0)
    learn = vision_learner(dls, resnet18, pretrained=False, metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    label, idx, probs = learn.predict(df.fname.iloc[0])
    assert df.fname.iloc[0].endswith('.dcm') and label in ('finding', 'normal') and dls.vocab[int(idx)] == label
    assert probs.shape == (2,) and abs(float(probs.sum()) - 1) < 1e-5

def test_from_folder_layouts(tmp_path):
    "label folders split by the patients in the headers; or train/valid folders when valid_pct=None."
    for split in ('train', 'valid'):
        for lab in ('a', 'b'):
            for i in range(2):
                pid = f'{split}{lab}{i}'
                synth_dicom(tmp_path/'tv'/split/lab/f'{pid}.dcm', patient_id=pid, size=32, seed=i)
                synth_dicom(tmp_path/'flat'/lab/f'{pid}.dcm', patient_id=pid[:-1], size=32, seed=i)  # 2 images/patient
    dls = DicomDataLoaders.from_folder(tmp_path/'tv', valid_pct=None, bs=2, num_workers=0)
    assert sorted(p.parent.parent.name for p in dls.valid.items) == ['valid']*4 and list(dls.vocab) == ['a', 'b']
    dls = DicomDataLoaders.from_folder(tmp_path/'flat', valid_pct=0.25, seed=0, bs=2, num_workers=0)
    assert len(dls.valid_ds) == 2 and check_leakage(dls).empty
    assert type(dls.one_batch()[0]) is TensorDicom

def test_mixed_polarity_display_stage_agrees(tmp_path):
    """Sets mixing MONOCHROME1 and 2: modality values of the same anatomy are negatives of each other (PS3.3 C.7.6.3.1.2
    inverts after VOI); the default modality stage (presentation carried, applied by `Window`) and stage='display' both
    give windowed batches of one polarity."""
    rows = []
    for i, pi in enumerate(['MONOCHROME2', 'MONOCHROME1'] * 2):
        fn = synth_dicom(tmp_path/f'{pi}_{i}.dcm', modality='CR', photometric=pi, bits_stored=12, signed=False, slope=1.,
                         intercept=0., patient_id=f'P{i}', size=SIZE, seed=7)          # same image, both polarities
        rows.append(dict(fname=str(fn), PatientID=f'P{i}', label='ab'[i // 2], pi=pi))
    df = pd.DataFrame(rows)
    corr = lambda x: float(np.corrcoef(x[0, 0].cpu().numpy().ravel(), x[1, 0].cpu().numpy().ravel())[0, 1])
    for stage, sign in (('modality', 1), ('display', 1)):
        dls = DicomDataLoaders.from_df(df, seed=0, bs=2, stage=stage, windows=['auto'], item_tfms=DicomResize(SIZE),
                                       num_workers=0)
        x = dls.test_dl(df.iloc[:2]).one_batch()[0]                   # a MONOCHROME2 and a MONOCHROME1 file
        assert sign * corr(x) > 0.99, (stage, corr(x))
