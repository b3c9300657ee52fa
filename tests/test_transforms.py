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

# ---- DICOM masks: label-map images and Segmentation objects (PS3.3 C.8.20) ----
from pydicom.sequence import Sequence
from pydicom.pixels import pack_bits
from fastdcm.transforms import DicomMaskError, SEGMENTATION_SOP_CLASS

def write_seg_file(fn, frames, seg_numbers, z=None, kind='BINARY', max_frac=255, geometry=True):
    "A Segmentation object: frame i (0/1, or fraction in [0,1] for FRACTIONAL) of segment `seg_numbers[i]` at z[i]."
    frames = np.asarray(frames); nf, h, w = frames.shape
    z = [0.] * nf if z is None else z
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SEGMENTATION_SOP_CLASS, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset(); ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = SEGMENTATION_SOP_CLASS, meta.MediaStorageSOPInstanceUID, 'SEG'
    ds.PatientID, ds.SegmentationType = 'P1', kind
    ds.Rows, ds.Columns, ds.NumberOfFrames = h, w, nf
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, 'MONOCHROME2', 0
    ds.BitsAllocated = ds.BitsStored = 1 if kind == 'BINARY' else 8
    ds.HighBit = ds.BitsStored - 1
    segs = sorted(set(seg_numbers))
    ds.SegmentSequence = Sequence([Dataset() for _ in segs])
    for it, s in zip(ds.SegmentSequence, segs):
        it.SegmentNumber, it.SegmentLabel, it.SegmentAlgorithmType = s, f'segment {s}', 'MANUAL'
    items = []
    for s, zz in zip(seg_numbers, z):
        item, sid = Dataset(), Dataset()
        sid.ReferencedSegmentNumber = s
        if kind != 'LABELMAP': item.SegmentIdentificationSequence = Sequence([sid])
        if geometry:
            pos = Dataset(); pos.ImagePositionPatient = [0., 0., float(zz)]
            item.PlanePositionSequence = Sequence([pos])
        items.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(items)
    if kind == 'BINARY': ds.PixelData = pack_bits(frames.astype(np.uint8))
    elif kind == 'LABELMAP': ds.PixelData = frames.astype(np.uint8).tobytes()
    else:
        ds.MaximumFractionalValue, ds.SegmentationFractionalType = max_frac, 'PROBABILITY'
        ds.PixelData = np.round(frames * max_frac).astype(np.uint8).tobytes()
    ds.save_as(fn, enforce_file_format=True)
    return Path(fn)

def test_label_map_dicom_mask(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, (21, 19))
    # rescale present but ignored: a label map's classes are its STORED values
    fn = write_dcm(tmp_path/'labels.dcm', labels, signed=False, bits=8, slope=2., intercept=-7.)
    m = open_dicom_mask(fn, codes=['a', 'b', 'c', 'd'])
    assert type(m) is TensorMask and m.dtype == torch.long and m.shape == (21, 19)
    np.testing.assert_array_equal(m.numpy(), labels)
    assert m.codes == ['a', 'b', 'c', 'd']
    for src in (str(fn), fn.read_bytes(), pydicom.dcmread(fn), pd.Series({'fname': str(fn)})):
        np.testing.assert_array_equal(open_dicom_mask(src).numpy(), labels)
    r = DicomResize((9, 30), 'squish')(m)                  # masks resize with nearest neighbour: labels stay labels
    assert type(r) is TensorMask and r.dtype == torch.long and r.shape == (9, 30)
    assert set(r.unique().tolist()) <= set(labels.flatten().tolist())
    np.testing.assert_array_equal(DicomResize((42, 38), 'squish')(m).numpy(), labels.repeat(2, 0).repeat(2, 1))
    blk = DicomMaskBlock(codes=['a', 'b', 'c', 'd'])
    np.testing.assert_array_equal(blk.type_tfms[0](str(fn)).numpy(), labels)

def test_seg_binary_two_segments(tmp_path):
    rng = np.random.default_rng(2)
    h, w = 13, 17                               # 221 bits a frame: 1-bit frames don't start on byte boundaries
    s1, s2 = rng.random((h, w)) < 0.4, rng.random((h, w)) < 0.3
    expected = np.where(s2, 2, np.where(s1, 1, 0))   # overlap: the later segment (2) wins
    for order in ([1, 2], [2, 1]):                    # the frame order doesn't matter
        frames = np.stack([{1: s1, 2: s2}[s] for s in order])
        fn = write_seg_file(tmp_path/f'seg{order[0]}.dcm', frames, order)
        ds = pydicom.dcmread(fn)
        assert ds.BitsAllocated == 1 and ds.SegmentationType == 'BINARY' and ds.NumberOfFrames == 2
        m = open_dicom_mask(fn)
        assert type(m) is TensorMask and m.dtype == torch.long and m.shape == (h, w)
        np.testing.assert_array_equal(m.numpy(), expected)
    # without plane positions the frames of each segment still make one plane
    fn = write_seg_file(tmp_path/'nogeo.dcm', np.stack([s1, s2]), [1, 2], geometry=False)
    np.testing.assert_array_equal(open_dicom_mask(fn).numpy(), expected)

def test_seg_fractional_thresholded(tmp_path):
    rng = np.random.default_rng(3)
    f1, f2 = rng.random((16, 16)), rng.random((16, 16))
    fn = write_seg_file(tmp_path/'frac.dcm', np.stack([f1, f2]), [1, 3], kind='FRACTIONAL', max_frac=200)
    assert pydicom.dcmread(fn).BitsAllocated == 8
    q1, q2 = np.round(f1 * 200), np.round(f2 * 200)  # what the file stores
    expected = np.where(q2 >= 100, 3, np.where(q1 >= 100, 1, 0))
    np.testing.assert_array_equal(open_dicom_mask(fn).numpy(), expected)
    assert 0.2 < (expected > 0).mean() < 0.95       # the threshold really splits the values

@pytest.mark.parametrize('syntax', ['RLELossless', 'JPEG2000Lossless'])
@pytest.mark.parametrize('kind', ['FRACTIONAL', 'LABELMAP'])
def test_seg_compressed(tmp_path, kind, syntax):
    "SEG objects in compressed transfer syntaxes (as archives store them) give the same masks as uncompressed ones."
    import pydicom.uid
    rng = np.random.default_rng(4)
    frames = rng.random((2, 64, 64)) if kind == 'FRACTIONAL' else rng.integers(0, 4, (1, 64, 64))   # J2K: >= 32 px
    segs = [1, 3] if kind == 'FRACTIONAL' else [1]
    plain = write_seg_file(tmp_path/'plain.dcm', frames, segs, kind=kind)
    ds = pydicom.dcmread(plain); ds.compress(getattr(pydicom.uid, syntax)); ds.save_as(tmp_path/'packed.dcm')
    assert pydicom.dcmread(tmp_path/'packed.dcm').file_meta.TransferSyntaxUID.is_compressed
    exp = open_dicom_mask(plain).numpy()
    assert len(np.unique(exp)) > 1
    np.testing.assert_array_equal(open_dicom_mask(tmp_path/'packed.dcm').numpy(), exp)

def test_seg_several_planes_needs_frame(tmp_path):
    rng = np.random.default_rng(4)
    a, b, c = (rng.random((3, 8, 8)) < 0.5)
    fn = write_seg_file(tmp_path/'vol.dcm', np.stack([a, b, c]), [1, 1, 2], z=[0., 2.5, 0.])
    with pytest.raises(DicomMaskError, match=r'vol\.dcm.*2 planes.*frame='):
        open_dicom_mask(fn)
    np.testing.assert_array_equal(open_dicom_mask(fn, frame=0).numpy(), np.where(c, 2, np.where(a, 1, 0)))
    np.testing.assert_array_equal(open_dicom_mask(fn, frame=1).numpy(), b.astype(int))
    np.testing.assert_array_equal(open_dicom_mask(pd.Series({'fname': str(fn), 'frame': 1})).numpy(), b.astype(int))
    with pytest.raises(DicomMaskError, match='out of range'): open_dicom_mask(fn, frame=2)

def test_non_integer_or_negative_label_map_raises(tmp_path):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = '1.2.840.10008.5.1.4.1.1.30', generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset(); ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, 'OT'
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated = 1, 'MONOCHROME2', 32
    ds.FloatPixelData = (np.arange(16, dtype=np.float32) / 3).tobytes()   # a parametric map, not classes
    ds.save_as(tmp_path/'float_map.dcm', enforce_file_format=True)
    with pytest.raises(DicomMaskError, match=r'float_map\.dcm.*not integers') as e:
        open_dicom_mask(tmp_path/'float_map.dcm')
    assert isinstance(e.value, DicomError)
    neg = write_dcm(tmp_path/'neg_labels.dcm', np.array([[0, 1], [-1, 2]]), signed=True)
    with pytest.raises(DicomMaskError, match=r'neg_labels\.dcm.*>= 0'): open_dicom_mask(neg)

def _square_set(tmp_path, n=8, size=48):
    "Images with a bright square (HU 1000 on 0) and DICOM masks of that square: half SEG, half label maps."
    rng = np.random.default_rng(5); rows = []
    for i in range(n):
        top, left = rng.integers(6, size - 26, 2); side = rng.integers(14, 20)
        sq = np.zeros((size, size), bool); sq[top:top+side, left:left+side] = True
        img = write_dcm(tmp_path/f'img{i}.dcm', (sq * 1000 + 24).astype(np.int16), intercept=-24.)
        if i % 2: msk = write_seg_file(tmp_path/f'mask{i}.dcm', sq[None], [1])
        else: msk = write_dcm(tmp_path/f'mask{i}.dcm', sq.astype(np.uint8), signed=False, bits=8)
        rows.append(dict(fname=str(img), mask=str(msk)))
    return pd.DataFrame(rows)

def test_dicom_mask_block_aligned_after_rotation_and_unet_fits(tmp_path):
    from fastai.vision.all import resnet18, set_seed
    from fastdcm.augment import dicom_aug_transforms
    from fastdcm.learner import unet_learner
    set_seed(0)
    df = _square_set(tmp_path)
    dblock = DataBlock(blocks=(DicomBlock(), DicomMaskBlock(codes=['bg', 'square'])), get_x=ColReader('fname'),
                       get_y=ColReader('mask'), splitter=RandomSplitter(0.25, seed=0), item_tfms=DicomResize(40),
                       batch_tfms=dicom_aug_transforms(max_rotate=40., max_zoom=1.2, p_affine=1., max_lighting=0.))
    dls = dblock.dataloaders(df, bs=6, num_workers=0)
    x, m = dls.one_batch()
    assert type(x) is TensorDicom and type(m) is TensorMask and m.dtype == torch.long
    assert x.shape == (6, 1, 40, 40) and m.shape == (6, 40, 40)
    assert set(m.unique().tolist()) == {0, 1}
    bright = x[:, 0].cpu() > 500                                   # the square in the augmented image
    agree = (bright == m.cpu().bool()).float().mean()
    assert agree > 0.95, f'image and DICOM mask moved differently ({agree:.3f} agreement)'
    bright, mb = bright.as_subclass(torch.Tensor), m.cpu().bool().as_subclass(torch.Tensor)
    iou = ((bright & mb).sum(dim=(1, 2)).float() / (bright | mb).sum(dim=(1, 2)).float()).min()
    assert iou > 0.85, f'the square in the image and in the mask overlap poorly (IoU {iou:.3f})'
    # the augmentation did rotate: a rotated square fills less of its bounding box than an axis-aligned one
    fill = []
    for mi in m.cpu().bool():
        rows, cols = mi.any(1).nonzero(), mi.any(0).nonzero()
        fill.append(mi.sum().item() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)).item())
    assert min(fill) < 0.9, f'no rotation seen in the batch (bounding-box fill {fill})'
    learn = unet_learner(dls, resnet18, pretrained=False)
    assert learn.model[0][0].in_channels == 1
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert np.isfinite(learn.recorder.values[-1]).all()

def test_seg_labelmap_and_bad_segment_numbers(tmp_path):
    rng = np.random.default_rng(6)
    planes = rng.integers(0, 4, (2, 9, 11))
    fn = write_seg_file(tmp_path/'lm.dcm', planes, [1, 2], z=[0., 1.], kind='LABELMAP')
    with pytest.raises(DicomMaskError, match='frame='): open_dicom_mask(fn)
    for i in range(2): np.testing.assert_array_equal(open_dicom_mask(fn, frame=i).numpy(), planes[i])
    zero = write_seg_file(tmp_path/'seg0.dcm', np.ones((1, 4, 4)), [0])
    with pytest.raises(DicomMaskError, match=r'seg0\.dcm.*start at 1'): open_dicom_mask(zero)
    ds = pydicom.dcmread(write_seg_file(tmp_path/'x.dcm', np.ones((1, 4, 4)), [1]))
    ds.SegmentationType = 'SURFACE'
    with pytest.raises(DicomMaskError, match='not supported'): open_dicom_mask(ds)
