"Tests for fastdcm.transforms: TensorDicom, open_dicom, DicomBlock, DicomResize, show/show_batch/show_results."
import warnings
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid, CTImageStorage
from pydicom.data import get_testdata_file
from fastai.vision.all import (DataBlock, CategoryBlock, MaskBlock, ColReader, RandomSplitter, aug_transforms,
                               IntToFloatTensor, Normalize, TensorMask, TensorImage, Learner, PILMask, nn, Flatten)
from fastdcm.core import DicomError
from fastdcm.pixels import dicom_pixels
from fastdcm.transforms import *
from fastdcm.transforms import OpenDicom

CT = get_testdata_file('CT_small.dcm')
MR = get_testdata_file('MR_small.dcm')

def write_dcm(fn, arr, signed=True, bits=16, slope=1., intercept=0., photometric='MONOCHROME2', padding=None):
    "A minimal valid CT file holding `arr` as stored values."
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset(); ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = 'CT', 'P1'
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits-1, int(signed)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if padding is not None: ds.PixelPaddingValue = padding
    dt = {(8,False): np.uint8, (16,False): np.uint16, (16,True): np.int16}[(ds.BitsAllocated, signed)]
    ds.PixelData = arr.astype(dt).tobytes()
    ds.save_as(fn, enforce_file_format=True)
    return Path(fn)

@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    out = []
    for i in range(8):
        h = 40+8*(i%3)
        yy,xx = np.mgrid[:h,:48]
        cy,cx = rng.integers(12, h-12), rng.integers(12, 36)
        disk = ((yy-cy)**2 + (xx-cx)**2) < rng.integers(40, 120)  # a bright round object on a gradient
        arr = (disk*2500 + xx*10 + rng.integers(0, 50, (h,48))).astype(np.int16)
        out.append(write_dcm(tmp_path/f'im{i}.dcm', arr, slope=[1.,0.5][i%2], intercept=-1024.))
    return out

def test_open_matches_dicom_pixels(files):
    for f in files[:3] + [Path(CT), Path(MR)]:
        t = open_dicom(f)
        assert type(t) is TensorDicom and t.dtype == torch.float32 and t.ndim == 3 and t.shape[0] == 1
        np.testing.assert_array_equal(t[0].numpy(), dicom_pixels(f))

def test_sources_equivalent(files):
    f = files[0]
    ref = open_dicom(f)
    for src in (str(f), f.read_bytes(), pydicom.dcmread(f), pd.Series({'fname': str(f), 'label': 'a'})):
        assert torch.equal(open_dicom(src), ref)
    with pytest.raises(KeyError, match='fname'): open_dicom(pd.Series({'path': str(f)}))

def test_stage_display_in_unit_range():
    t = open_dicom(CT, stage='display')
    assert 0 <= t.min() and t.max() <= 1

def test_multiframe_needs_choice():
    rt = get_testdata_file('rtdose.dcm')
    with pytest.raises(DicomError, match='rtdose.dcm.*frames'): open_dicom(rt)
    assert open_dicom(rt, frames_as_channels=True).shape[0] == 15
    np.testing.assert_array_equal(open_dicom(rt, frame=2)[0].numpy(), dicom_pixels(rt, frame=2))

def test_cache_is_called(files):
    calls = []
    def cache(src, stage='modality', frame=None, window=None):
        calls.append((str(src), stage, frame)); return dicom_pixels(src, stage=stage, frame=frame)
    t = DicomBlock(cache=cache).type_tfms[0](str(files[0]))
    assert calls == [(str(files[0]), 'modality', None)]
    assert torch.equal(t, open_dicom(files[0]))

def test_int_to_float_leaves_dicom_alone():
    t = open_dicom(CT)
    assert torch.equal(IntToFloatTensor()(t), t)
    assert torch.equal(IntToFloatTensor().decode(t), t)

def _dls(files, tmp_path, batch_tfms=None, masks=False, size=32, bs=4):
    df = pd.DataFrame(dict(fname=[str(f) for f in files], label=['a','b']*(len(files)//2)))
    if masks:
        df['mask'] = ''
        for i,f in enumerate(files):
            m = (dicom_pixels(f) > 300).astype(np.uint8)
            PILMask.create(m).save(tmp_path/f'm{i}.png'); df.loc[i,'mask'] = str(tmp_path/f'm{i}.png')
    blocks = (DicomBlock(), MaskBlock(['bg','fg']) if masks else CategoryBlock)
    db = DataBlock(blocks=blocks, get_x=ColReader('fname'), get_y=ColReader('mask' if masks else 'label'),
                   splitter=RandomSplitter(0.25, seed=0), item_tfms=DicomResize(size), batch_tfms=batch_tfms)
    return db.dataloaders(df, bs=bs, num_workers=0)

def test_batch_values_equal_dicom_pixels(files, tmp_path):
    dls = _dls(files, tmp_path)
    x,y = dls.valid.one_batch()
    assert type(x) is TensorDicom and x.dtype == torch.float32 and x.shape[1:] == (1,32,32)
    for i in range(len(x)):
        f = dls.valid.items.iloc[i]['fname']
        ref = DicomResize(32)(TensorDicom(torch.from_numpy(dicom_pixels(f))[None]), split_idx=1)
        torch.testing.assert_close(x[i].cpu(), ref)

def test_types_retained_through_batch_tfms(files, tmp_path):
    dls = _dls(files, tmp_path, batch_tfms=[*aug_transforms(max_lighting=0, size=32), Normalize.from_stats(0., 1000.)])
    x,y = dls.one_batch()
    assert type(x) is TensorDicom and x.abs().max() > 0.5 # HU / 1000, not / 255 / 1000
    xd,yd = dls.decode_batch((x,y))[0]
    assert type(xd) is TensorDicom

def test_segmentation_masks_aligned_and_not_scaled(files, tmp_path):
    dls = _dls(files, tmp_path, batch_tfms=aug_transforms(max_lighting=0, max_rotate=30, p_affine=1., size=32), masks=True)
    torch.manual_seed(0)
    x,m = dls.one_batch()
    assert type(x) is TensorDicom and type(m) is TensorMask
    assert x.max() > 300                                 # modality values, not divided by 255
    # the mask still marks the pixels above 300 (bilinear vs nearest differ only on edges)
    agree = ((x[:,0] > 300) == m.bool()).float().mean()
    assert agree > 0.9, agree

def test_resize_crop_random_on_train_centre_on_valid():
    x = TensorDicom(torch.arange(10*20, dtype=torch.float32).view(1,10,20))
    assert torch.equal(DicomResize(10)(x, split_idx=1), x[..., 5:15])
    seen = {DicomResize(10)(x, split_idx=0)[0,0,0].item() for _ in range(30)}
    assert len(seen) > 3

def test_resize_pad_uses_minimum_and_squish():
    x = TensorDicom(torch.full((1,10,20), 100.)); x[0,0,0] = -500.
    y = DicomResize(20, 'pad')(x, split_idx=1)
    assert y.shape == (1,20,20) and y[0,0].eq(-500).all() and y[0,-1].eq(-500).all()
    assert DicomResize((5,7), 'squish')(x).shape == (1,5,7)

def test_resize_mask_nearest():
    m = TensorMask(torch.randint(0, 4, (30,40)))
    x = TensorDicom(torch.rand(1,30,40))
    _,mr = DicomResize(16)((x, m), split_idx=1)
    assert type(mr) is TensorMask and mr.shape == (16,16) and set(mr.unique().tolist()) <= {0,1,2,3}

def test_show_percentile_and_windowed():
    t = open_dicom(CT)
    ax = t.show()
    im = ax.get_images()[0]
    lo,hi = im.get_clim()
    assert t.min() < lo < hi < t.max()                   # robust window, not the full range
    plt.close('all')
    w = TensorDicom(torch.rand(3,16,16), windows=['a','b','c'])
    assert w.show().get_images()[0].get_clim() == (0., 1.)
    plt.close('all')

def test_show_batch_and_results(files, tmp_path):
    dls = _dls(files, tmp_path)
    dls.show_batch(max_n=2)
    assert plt.gcf().axes
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(4, 2))
    learn = Learner(dls, model)
    learn.show_results(max_n=2)
    assert plt.gcf().axes
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        lbl, idx, probs = learn.predict(str(files[0]))
    assert lbl in ('a','b') and len(probs) == 2
    plt.close('all')

def test_rgb_show_and_meta():
    t = open_dicom(get_testdata_file('SC_rgb_rle_2frame.dcm'), frame=0)
    assert t.rgb and t.shape[0] == 3
    assert t.show().get_images()[0].get_array().shape == (100, 100, 3)
    plt.close('all')
