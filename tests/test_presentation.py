"""MONOCHROME1 in the default path (issue 8 item 1): a mixed MONOCHROME1/2 set of the same anatomy, opened at the
default modality stage, gives one polarity -- bone bright -- in every windowed item and every picture."""
import warnings
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np, pandas as pd, pytest, torch
from fastai.vision.all import DataBlock, CategoryBlock, ColReader, IndexSplitter, aug_transforms
from fastai.torch_core import batch_to_samples
from fastdcm.synth import synth_image, synth_dicom
from fastdcm.transforms import TensorDicom, open_dicom, DicomBlock, presentation_inverts, presentation_flags
from fastdcm.augment import Window, RandomWindow, DicomHistEq, DicomCLAHE
from fastdcm.data import DicomDataLoaders

CHEST = synth_image('chest', size=64, seed=1)
BONE = CHEST > np.percentile(CHEST, 90)
SOFT = (CHEST > np.percentile(CHEST, 20)) & (CHEST < np.percentile(CHEST, 50))

@pytest.fixture(scope='module')
def xray_df(tmp_path_factory):
    "Eight copies of one chest radiograph: CR MONOCHROME1 (INVERSE) and DX MONOCHROME2, 12-bit, one patient each."
    tmp = tmp_path_factory.mktemp('xr')
    rows = []
    for i in range(8):
        pi = ['MONOCHROME1', 'MONOCHROME2'][i % 2]
        fn = synth_dicom(tmp/f'xr{i}.dcm', CHEST, modality=['CR', 'DX'][i % 2], photometric=pi, bits_stored=12,
                         signed=False, seed=i, patient_id=f'P{i}')
        rows.append(dict(fname=str(fn), label=pi, PatientID=f'P{i}'))
    return pd.DataFrame(rows)

def _bone_bright(img):
    "Bone brighter than soft tissue by a clear margin in a [0,1] plane."
    img = torch.as_tensor(np.asarray(img, dtype=np.float32))
    return float(img[torch.from_numpy(BONE)].mean() - img[torch.from_numpy(SOFT)].mean()) > 0.2

def _dls(df, batch_tfms, num_workers=0):
    "All eight items in the validation set (no geometric augmentation there), one more for training; modality stage."
    df = pd.concat([df, df.iloc[:2]], ignore_index=True)
    return DataBlock(blocks=(DicomBlock(), CategoryBlock), get_x=ColReader('fname'), get_y=ColReader('label'),
                     splitter=IndexSplitter(list(range(8))), batch_tfms=batch_tfms
                     ).dataloaders(df, bs=8, num_workers=num_workers)

def test_flags_from_the_header(xray_df):
    m1, m2 = open_dicom(xray_df.fname[0]), open_dicom(xray_df.fname[1])
    assert (m1.inverted, m2.inverted) == (True, False)
    assert open_dicom(xray_df.fname[0], stage='display').inverted is False
    assert open_dicom(xray_df.fname[0], stage='stored').inverted is True
    from pydicom.dataset import Dataset
    ds = Dataset(); ds.PhotometricInterpretation = 'MONOCHROME2'
    assert not presentation_inverts(ds)
    ds.PresentationLUTShape = 'INVERSE'; assert presentation_inverts(ds)
    item = Dataset(); item.LUTDescriptor = [3, 0, 8]; item.LUTData = [255, 128, 0]
    ds = Dataset(); ds.PhotometricInterpretation = 'MONOCHROME2'; ds.PresentationLUTSequence = [item]
    assert presentation_inverts(ds)    # a decreasing Presentation LUT inverts

@pytest.mark.parametrize('num_workers', [0, 2])
def test_flags_follow_collation(xray_df, num_workers):
    dls = _dls(xray_df, None, num_workers)
    x, y = dls.valid.one_batch()
    labels = list(dls.vocab[y])
    assert x.inverted == tuple(l == 'MONOCHROME1' for l in labels)
    assert [o.inverted for o in x] == [l == 'MONOCHROME1' for l in labels]
    assert x[2:5].inverted == x.inverted[2:5] and x[3].inverted == x.inverted[3]
    assert torch.cat([x[:3], x[3:]]).inverted == x.inverted
    samples = batch_to_samples((x, y), 8)        # what show_batch takes apart
    assert [s[0].inverted for s in samples] == [l == 'MONOCHROME1' for l in labels]
    assert torch.equal(presentation_flags(x, 8), torch.tensor(x.inverted))

@pytest.mark.parametrize('tfm', [lambda: Window('auto'), lambda: Window(['auto', 'histeq']), lambda: Window((2048, 4096)),
                                 lambda: RandomWindow('auto'), lambda: DicomHistEq(), lambda: DicomCLAHE()],
                         ids=['auto', 'auto+histeq', 'fixed', 'random', 'histeq', 'clahe'])
def test_bone_bright_in_every_windowed_item(xray_df, tfm):
    x, y = _dls(xray_df, [tfm()]).valid.one_batch()
    assert x.windows
    for img in x:
        for ch in img: assert _bone_bright(ch), 'a windowed item has the opposite polarity'

def test_random_window_on_training_batches(xray_df):
    dls = DataBlock(blocks=(DicomBlock(), CategoryBlock), get_x=ColReader('fname'), get_y=ColReader('label'),
                    splitter=IndexSplitter([0]), batch_tfms=[RandomWindow('auto', max_center=0.05, max_width=0.1)]
                    ).dataloaders(xray_df, bs=8)
    x, _ = dls.train.new(bs=7).one_batch()
    for img in x: assert _bone_bright(img[0])

def test_flags_survive_geometric_augmentation(xray_df):
    dls = DataBlock(blocks=(DicomBlock(), CategoryBlock), get_x=ColReader('fname'), get_y=ColReader('label'),
                    splitter=IndexSplitter([0]), batch_tfms=aug_transforms(max_rotate=30, p_affine=1.)
                    ).dataloaders(xray_df, bs=8)
    x, y = dls.train.new(bs=7).one_batch()
    assert isinstance(x, TensorDicom)
    assert x.inverted == tuple(l == 'MONOCHROME1' for l in dls.vocab[y])

def _axes_luma(ax):
    "The picture an axes shows, as luminance in [0,1] (colour map and limits applied)."
    im = ax.get_images()[0]
    return im.to_rgba(im.get_array(), bytes=False)[..., :3].mean(-1)

@pytest.mark.parametrize('batch_tfms', [None, [Window('auto')]], ids=['modality', 'windowed'])
def test_show_batch_bone_bright_in_every_picture(xray_df, batch_tfms):
    dls = _dls(xray_df, batch_tfms)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        dls.valid.show_batch(max_n=8, nrows=2, ncols=4)
    fig = plt.gcf()
    axs = [a for a in fig.axes if a.get_images()]
    assert len(axs) == 8
    for ax in axs: assert _bone_bright(_axes_luma(ax))
    plt.close('all')

def test_item_show_bone_bright(xray_df):
    for fn in xray_df.fname[:2]:
        fig, ax = plt.subplots()
        open_dicom(fn).show(ctx=ax)
        assert _bone_bright(_axes_luma(ax))
        plt.close(fig)

def test_dicom_dataloaders_default_path(xray_df):
    dls = DicomDataLoaders.from_df(xray_df, valid_pct=0.5, seed=0, windows=['auto'], bs=4)
    for dl in (dls.train, dls.valid):
        x, _ = dl.one_batch()
        for img in x: assert _bone_bright(img[0])

def test_flags_count_checked():
    x = TensorDicom(torch.zeros(3, 1, 4, 4), inverted=(True, False))
    with pytest.raises(ValueError, match="2 values of 'inverted' for a batch of 3"): presentation_flags(x, 3)

@pytest.mark.parametrize('batch_tfms', [None, [Window('auto')]], ids=['modality', 'windowed'])
def test_show_results_bone_bright_in_every_picture(xray_df, batch_tfms):
    from fastai.vision.all import resnet18
    from fastdcm.learner import vision_learner
    df = pd.concat([xray_df, xray_df], ignore_index=True)          # the same eight again, for training
    dls = DataBlock(blocks=(DicomBlock(), CategoryBlock), get_x=ColReader('fname'), get_y=ColReader('label'),
                    splitter=IndexSplitter(list(range(8))), batch_tfms=batch_tfms).dataloaders(df, bs=8)
    learn = vision_learner(dls, resnet18, pretrained=False)
    with warnings.catch_warnings(), learn.no_bar():
        warnings.simplefilter('ignore')
        learn.show_results(max_n=8, nrows=2, ncols=4)
    axs = [a for a in plt.gcf().axes if a.get_images()]
    assert len(axs) == 8
    for ax in axs: assert _bone_bright(_axes_luma(ax))
    plt.close('all')
