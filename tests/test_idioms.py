"""fastai idioms without traps (issue 15): fastai's Resize/crops on DICOM tensors, `predict` on a Path/str/bytes/Dataset
(also after `load_learner` in a fresh process), either import order, and the raw-values warning once."""
import os, subprocess, sys, textwrap, warnings
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
import pydicom
from fastai.vision.all import (DataBlock, CategoryBlock, ColReader, RandomSplitter, Resize, RandomResizedCrop, CropPad,
                               RandomCrop, TensorMask, aug_transforms, resnet18, nn, load_learner, ImageBlock,
                               PILImage, Normalize)
from fastdcm.synth import synth_study_set, synth_dicom, synth_image
from fastdcm.transforms import TensorDicom, DicomBlock, DicomResize, DicomMaskBlock, open_dicom
from fastdcm.data import DicomDataLoaders
from fastdcm.learner import vision_learner, unet_learner, RawValuesWarning, is_dicom_dls
from fastdcm.augment import Window

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope='module')
def study(tmp_path_factory):
    return synth_study_set(tmp_path_factory.mktemp('st')/'study', n_patients=8, images_per_patient=2, size=32, seed=0)

def _quiet_fit(learn, n=1):
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(n, 1e-3)

# --- 1. fastai's item transforms on TensorDicom ---------------------------------------------------------------------

def test_fastai_resize_on_dicom_image_and_mask():
    x = TensorDicom(torch.linspace(-1000, 3000, 96*96).view(1, 96, 96))
    m = TensorMask((torch.arange(96*96).view(96, 96) // 500 % 3).long())
    for split_idx in (0, 1):
        rx, rm = Resize(48)((x, m), split_idx=split_idx)
        assert (type(rx), rx.shape, type(rm), rm.shape) == (TensorDicom, (1, 48, 48), TensorMask, (48, 48))
        torch.testing.assert_close(rx.as_subclass(torch.Tensor), DicomResize(48)(x, split_idx=1).as_subclass(torch.Tensor))
        assert torch.equal(rm.as_subclass(torch.Tensor), DicomResize(48)(m, split_idx=1).as_subclass(torch.Tensor))
        assert set(rm.unique().tolist()) <= {0, 1, 2}             # nearest: no invented classes
    assert float(rx.max()) > 255                                   # float modality values, no 8-bit round trip

def test_fastai_crops_on_dicom():
    x = TensorDicom(torch.rand(1, 60, 90) * 4000 - 1000)
    assert RandomResizedCrop(32)(x, split_idx=0).shape == (1, 32, 32)
    assert RandomResizedCrop(32)(x, split_idx=1).shape == (1, 32, 32)
    assert CropPad(64)(x).shape == (1, 64, 64)
    assert RandomCrop(40)(x, split_idx=0).shape == (1, 40, 40)
    padded = Resize(48, method='pad', pad_mode='zeros')(x, split_idx=1)
    assert padded.shape == (1, 48, 48) and float(padded[0, 0, 0]) == pytest.approx(float(x.min()), abs=1e-3)

def test_mixed_size_folder_collates_with_resize(tmp_path):
    rows = []
    for i, size in enumerate([48, 64, 80, 96, 48, 64]):
        fn = synth_dicom(tmp_path/f'im{i}.dcm', modality='CT', size=size, seed=i, patient_id=f'P{i}')
        rows.append(dict(fname=str(fn), label='ab'[i % 2]))
    dls = DataBlock(blocks=(DicomBlock(), CategoryBlock), get_x=ColReader('fname'), get_y=ColReader('label'),
                    splitter=RandomSplitter(0.34, seed=0), item_tfms=Resize(32)).dataloaders(pd.DataFrame(rows), bs=4)
    x, _ = dls.train.one_batch()
    assert x.shape == (4, 1, 32, 32) and float(x.min()) < -500     # HU kept

# --- 2. predict on a Path, str, bytes and Dataset ---------------------------------------------------------------------

def _colreader_dls(study):
    "The DESIGN page's spelling: fastai's own ColReader for get_x."
    return DataBlock(blocks=(DicomBlock(), CategoryBlock), get_x=ColReader('fname'), get_y=ColReader('label'),
                     splitter=RandomSplitter(0.25, seed=0), batch_tfms=[Window(['auto'])]).dataloaders(study, bs=4)

def test_predict_on_path_str_bytes_dataset(study, tmp_path):
    dls = _colreader_dls(study)
    learn = vision_learner(dls, resnet18, pretrained=False)
    _quiet_fit(learn)
    fn = study.fname.iloc[0]
    with learn.no_bar():
        outs = [learn.predict(s) for s in (Path(fn), str(fn), Path(fn).read_bytes(), pydicom.dcmread(fn))]
    assert len({o[0] for o in outs}) == 1
    for o in outs[1:]: torch.testing.assert_close(o[2], outs[0][2])
    # after load_learner, in a fresh process
    learn.export(tmp_path/'clf.pkl')
    code = textwrap.dedent(f"""
        import warnings; warnings.filterwarnings('ignore')
        from pathlib import Path
        from fastai.learner import load_learner
        learn = load_learner({str(tmp_path/'clf.pkl')!r})
        with learn.no_bar(): label, idx, probs = learn.predict(Path({fn!r}))
        print('LABEL', label, float(probs.sum()))""")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    line = [l for l in out.stdout.splitlines() if l.startswith('LABEL')][0].split()
    assert line[1] == outs[0][0] and float(line[2]) == pytest.approx(1., abs=1e-4)

def test_predict_segmentation_on_path(tmp_path):
    from PIL import Image
    from fastai.vision.all import MaskBlock
    rows = []
    yy, xx = np.mgrid[:40, :40]
    for i in range(6):
        disk = ((yy - 12 - 3*i)**2 + (xx - 20)**2) < 60
        img = synth_dicom(tmp_path/f's{i}.dcm', np.where(disk, 0.9, 0.2).astype(np.float32), modality='CT', size=40,
                          seed=i, patient_id=f'P{i}')
        Image.fromarray(disk.astype(np.uint8)).save(tmp_path/f'm{i}.png')
        rows.append(dict(fname=str(img), mask=str(tmp_path/f'm{i}.png')))
    dls = DataBlock(blocks=(DicomBlock(), MaskBlock(codes=['bg', 'disk'])), get_x=ColReader('fname'),
                    get_y=ColReader('mask'), splitter=RandomSplitter(0.34, seed=0)).dataloaders(pd.DataFrame(rows), bs=2)
    learn = unet_learner(dls, resnet18, pretrained=False)
    with learn.no_bar():
        pred, _, probs = learn.predict(Path(rows[0]['fname']))
        pred_str = learn.predict(rows[0]['fname'])[0]
    assert tuple(pred.shape) == (40, 40) and torch.equal(torch.as_tensor(pred), torch.as_tensor(pred_str))
    assert tuple(probs.shape) == (2, 40, 40)

# --- 3. either import order -----------------------------------------------------------------------------------------

ORDER_SCRIPT = """
import sys, warnings; warnings.filterwarnings('ignore')
if sys.argv[1] == 'fastai_last':
    from fastdcm.all import *
    from fastai.vision.all import *
else:
    from fastai.vision.all import *
    from fastdcm.all import *
import pydicom
path = Path(sys.argv[2])
study = synth_study_set(path/'study', n_patients=8, images_per_patient=2, size=32, seed=0)
dls = DicomDataLoaders.from_df(study, seed=0, bs=4, num_workers=0)
learn = vision_learner(dls, resnet18, pretrained=False)
first = learn.model[0][0]
with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
with learn.no_bar(): label, idx, probs = learn.predict(Path(study.fname.iloc[0]))
print('RESULT', first.in_channels, label in dls.vocab, round(float(probs.sum()), 4))
"""

@pytest.mark.parametrize('order', ['fastai_last', 'fastai_first'])
def test_either_import_order(order, tmp_path):
    out = subprocess.run([sys.executable, '-c', ORDER_SCRIPT, order, str(tmp_path)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    res = [l for l in out.stdout.splitlines() if l.startswith('RESULT')][0].split()
    assert res[1:] == ['1', 'True', '1.0']

def test_fastai_names_are_dicom_aware_and_defer_for_images(tmp_path):
    import fastai.vision.all as fva, fastai.vision.learner as fvl
    assert fva.vision_learner is vision_learner and fvl.unet_learner is unet_learner
    # a plain image DataLoaders: fastai's own behaviour (3 channels, no statistics added when not pretrained)
    from PIL import Image
    for i in range(6): Image.fromarray((np.random.default_rng(i).random((24, 24, 3))*255).astype(np.uint8)).save(tmp_path/f'{i}.png')
    df = pd.DataFrame(dict(fname=[str(tmp_path/f'{i}.png') for i in range(6)], label=list('ababab')))
    dls = DataBlock(blocks=(ImageBlock, CategoryBlock), get_x=ColReader('fname'), get_y=ColReader('label'),
                    splitter=RandomSplitter(0.34, seed=0)).dataloaders(df, bs=2)
    assert not is_dicom_dls(dls)
    learn = vision_learner(dls, resnet18, pretrained=False)
    assert learn.model[0][0].in_channels == 3
    assert not any(isinstance(t, Normalize) for t in dls.after_batch.fs)

# --- 5. raw values into a pretrained model: said once -----------------------------------------------------------------

def tiny_arch(pretrained=False, **kwargs):
    "A small offline 'pretrained' architecture (no download) with fastai's cut point (a pooling layer)."
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))

def test_raw_values_warning_once(study):
    dls = DicomDataLoaders.from_df(study, seed=0, bs=4, batch_tfms=aug_transforms(), num_workers=0)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        learn = vision_learner(dls, tiny_arch, pretrained=True)
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    raw = [w for w in rec if issubclass(w.category, RawValuesWarning)]
    assert len(raw) == 1
    msg = str(raw[0].message)
    assert "windows=['auto']" in msg and 'Window' in msg and '[0,1]' in msg
    # with a window there is nothing to say
    dlw = DicomDataLoaders.from_df(study, seed=0, bs=4, windows=['auto'], num_workers=0)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        vision_learner(dlw, tiny_arch, pretrained=True)
    assert not [w for w in rec if issubclass(w.category, RawValuesWarning)]

# --- 4. frames as items ---------------------------------------------------------------------------------------------

def test_frames_as_items(tmp_path):
    from fastdcm.core import index_dicoms
    from fastdcm.pixels import dicom_pixels
    for p in range(4):
        synth_dicom(tmp_path/f'cine{p}.dcm', modality='US', frames=4, size=32, seed=p, patient_id=f'P{p}')
    df = index_dicoms(tmp_path, frames=True, progress=False)
    assert len(df) == 16 and sorted(df.frame.unique().tolist()) == [0, 1, 2, 3]
    df['label'] = ['ab'[int(f) % 2] for f in df.frame]
    dls = DicomDataLoaders.from_df(df, valid_pct=0.5, seed=0, bs=4, num_workers=0, shuffle=False)
    tr, va = dls.train.items, dls.valid.items
    assert not set(tr.PatientID) & set(va.PatientID)                      # every frame of a patient on one side
    assert len(tr) == len(va) == 8
    x, _ = dls.valid.one_batch()
    for i in range(4):
        r = va.iloc[i]
        want = dicom_pixels(r.fname, frame=int(r.frame))
        got = x[i].as_subclass(torch.Tensor).numpy()
        np.testing.assert_allclose(got.reshape(want.shape[-2:]) if want.ndim == 2 else np.moveaxis(got, 0, -1), want, atol=1e-4)
    frames = [x[i].as_subclass(torch.Tensor) for i in range(4)]
    assert any(not torch.equal(frames[0], f) for f in frames[1:])          # distinct frames, not one frame four times
