"""PNG and DICOM in one pipeline (issue 12): foreign images as TensorDicom with a source tag, mixed DataBlocks, and
harmonisation that gives the same anatomy from two sites matching histograms."""
import io
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from PIL import Image
from fastai.vision.all import DataBlock, CategoryBlock, ColReader, IndexSplitter
from fastdcm.core import DicomError
from fastdcm.pixels import dicom_pixels
from fastdcm.synth import synth_image, synth_dicom
from fastdcm.export import write_converted
from fastdcm.transforms import TensorDicom, DicomBlock, open_dicom, open_image, is_image_file, ForeignImageError
from fastdcm.augment import Harmonize, HARMONIZE_METHODS, body_mask

def site_a_png(fn, density, rng, gamma=0.7, q=85, invert=False):
    "Someone else's chain: an unknown window, a gamma tone curve, maybe inverted, 8 bits, JPEG at quality `q`."
    lo, hi = np.percentile(density, [rng.uniform(0, 5), rng.uniform(95, 100)])
    v = np.clip((density - lo) / (hi - lo), 0, 1) ** gamma + rng.normal(0, 0.01, density.shape)
    if invert: v = 1 - v
    buf = io.BytesIO(); Image.fromarray(np.clip(v*255, 0, 255).round().astype(np.uint8)).save(buf, format='JPEG', quality=q)
    Path(fn).write_bytes(buf.getvalue()); return Path(fn)

def w1(a, b):
    "Wasserstein-1 distance between the value distributions of two same-size images."
    return float((a.flatten().sort().values - b.flatten().sort().values).abs().mean())

@pytest.fixture(scope='module')
def mixed(tmp_path_factory):
    "One chest radiograph as: 12-bit MONOCHROME1 DICOM, 8-bit PNG (no extension), 16-bit PNG, RGB-grey PNG, png16 export."
    tmp = tmp_path_factory.mktemp('mixed')
    d = synth_image('chest', size=64, seed=2)
    dcm = synth_dicom(tmp/'b.dcm', d, modality='CR', photometric='MONOCHROME1', bits_stored=12, signed=False)
    Image.fromarray((d*255).round().astype(np.uint8)).save(tmp/'a8.png'); (tmp/'a8.png').rename(tmp/'a8')
    Image.fromarray((d*65535).round().astype(np.uint16)).save(tmp/'a16.png')
    Image.fromarray(np.stack([(d*255).round().astype(np.uint8)]*3, -1)).save(tmp/'argb.png')
    write_converted(tmp/'b16.png', dicom_pixels(dcm))
    return d, dict(dcm=dcm, a8=tmp/'a8', a16=tmp/'a16.png', argb=tmp/'argb.png', b16=tmp/'b16.png')

def test_sources_and_values(mixed):
    d, f = mixed
    assert is_image_file(f['a8']) and not is_image_file(f['dcm'])
    a8, a16, argb, b16, dcm = (open_dicom(f[k]) for k in ('a8', 'a16', 'argb', 'b16', 'dcm'))
    assert (a8.source, a8.stage, dcm.source, dcm.stage, b16.source, b16.stage) == \
           ('foreign', 'display', 'dicom', 'modality', 'png16', 'modality')
    np.testing.assert_allclose(a8[0].numpy(), (d*255).round()/255, atol=1e-6)
    np.testing.assert_allclose(a16[0].numpy(), (d*65535).round()/65535, atol=1e-6)
    torch.testing.assert_close(argb, a8)
    np.testing.assert_allclose(b16[0].numpy(), dicom_pixels(f['dcm']), atol=1e-3)   # exact values back
    assert open_image(Path(f['a16']).read_bytes()).source == 'foreign'             # bytes too

def test_mixed_datablock_batches(mixed):
    d, f = mixed
    df = pd.DataFrame(dict(fname=[str(f[k]) for k in ('dcm', 'a8', 'a16', 'b16', 'dcm')], label=list('abaab')))
    dls = DataBlock(blocks=(DicomBlock(), CategoryBlock), get_x=ColReader('fname'), get_y=ColReader('label'),
                    splitter=IndexSplitter([4])).dataloaders(df, bs=4, shuffle=False)
    x, _ = dls.train.new(shuffle=False).one_batch()
    assert type(x) is TensorDicom and x.dtype == torch.float32 and x.shape == (4, 1, 64, 64)
    assert x.source == ('dicom', 'foreign', 'foreign', 'png16')
    assert x.stage == ('modality', 'display', 'display', 'modality') and x.inverted == (True, False, False, False)
    np.testing.assert_allclose(x[0, 0].numpy(), dicom_pixels(f['dcm']), atol=1e-4)
    np.testing.assert_allclose(x[1, 0].numpy(), (d*255).round()/255, atol=1e-6)
    h = Harmonize('histeq')(x)
    assert h.shape == x.shape and 0 <= float(h.min()) and float(h.max()) <= 1
    for i in (1, 2): assert w1(h[0], h[i]) < 0.03           # one anatomy, three encodings, one histogram
    # a png16 export keeps the values, not the presentation: its MONOCHROME1 source is the user's to declare
    b16 = open_image(f['b16'], invert=True)
    assert b16.inverted is True
    assert w1(h[0], Harmonize('histeq')(b16)) < 0.03

@pytest.mark.parametrize('method, body, limit, better', [('histeq', True, 0.02, True), ('clahe', False, 0.08, True),
                                                   ('percentile', True, 0.11, False)])
def test_harmonisation_matches_two_sites(tmp_path, method, body, limit, better):
    "Same anatomy, two sites: equalisation matches the histograms; a linear percentile map can't undo a tone curve (bounded only)."

    rng = np.random.default_rng(0)
    for seed in range(3):
        d = synth_image('chest', size=96, seed=seed)
        a = open_image(site_a_png(tmp_path/f'a{seed}.jpg', d, rng))
        b = open_dicom(synth_dicom(tmp_path/f'b{seed}.dcm', d, modality='CR', bits_stored=12, signed=False, seed=seed,
                                   photometric=['MONOCHROME1', 'MONOCHROME2'][seed % 2]))
        pair = torch.stack([a, b])
        before, after = w1(*Harmonize('none')(pair)), w1(*Harmonize(method, body=body)(pair))
        assert after < limit and (after < before or not better), (seed, before, after)

def test_inverted_foreign_png_is_declared(tmp_path):
    "An inverted PNG can't be told from its pixels with certainty: the user declares it, and then it matches."
    rng = np.random.default_rng(1)
    d = synth_image('chest', size=96, seed=5)
    plain = open_image(site_a_png(tmp_path/'p.jpg', d, np.random.default_rng(1)))
    inv_file = site_a_png(tmp_path/'i.jpg', d, np.random.default_rng(1), invert=True)
    declared = open_image(inv_file, invert=True)
    assert w1(*Harmonize('histeq', body=True)(torch.stack([plain, declared]))) < 0.02
    assert torch.corrcoef(torch.stack([plain.flatten(), open_image(inv_file).flatten()]))[0, 1] < -0.9

def test_body_mask_drops_border_and_text():
    img = torch.zeros(1, 1, 96, 96)
    img[..., 16:80, 20:76] = 0.6                      # the body
    img[..., 4:8, 4:30] = 1.0                         # a burned-in text label on the black border
    m = body_mask(img)
    assert m[..., 30:60, 30:60].all() and not m[..., 4:8, 4:30].any() and not m[..., :, :10].any()

def test_colour_and_bad_images_are_typed_errors(tmp_path):
    Image.fromarray((np.random.default_rng(0).random((8, 8, 3))*255).astype(np.uint8)).save(tmp_path/'c.png')
    with pytest.raises(ForeignImageError, match=r'c\.png.*colour'): open_dicom(tmp_path/'c.png')
    (tmp_path/'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0'*20)
    with pytest.raises(DicomError, match='broken.png'): open_image(tmp_path/'broken.png')
    with pytest.raises(ValueError, match='method must be one of'): Harmonize('gamma')

def test_predict_across_formats_and_domain_report(tmp_path):
    "A learner trained on PNG items predicts on a .dcm path (and one trained on DICOM on a PNG), same pipeline."
    from fastai.vision.all import resnet18
    from fastdcm.learner import vision_learner, domain_report
    rng = np.random.default_rng(0); png_rows, dcm_rows = [], []
    for i in range(12):
        d = synth_image('chest', size=48, finding=bool(i % 2), seed=i)
        png_rows.append(dict(fname=str(site_a_png(tmp_path/f'a{i}.jpg', d, rng)), label='ab'[i % 2]))
        dcm_rows.append(dict(fname=str(synth_dicom(tmp_path/f'b{i}.dcm', d, modality='DX', bits_stored=12, signed=False,
                                                   seed=i)), label='ab'[i % 2]))
    for train, other in ((png_rows, dcm_rows), (dcm_rows, png_rows)):
        dls = DataBlock(blocks=(DicomBlock(), CategoryBlock), get_x=ColReader('fname'), get_y=ColReader('label'),
                        splitter=IndexSplitter([0, 1, 2, 3]), batch_tfms=[Harmonize('histeq', body=True)]
                        ).dataloaders(pd.DataFrame(train), bs=4)
        learn = vision_learner(dls, resnet18, pretrained=False)
        with learn.no_bar(): label, idx, probs = learn.predict(Path(other[0]['fname']))
        assert label in ('a', 'b') and float(probs.sum()) == pytest.approx(1., abs=1e-5)
        rep = domain_report(learn, pd.DataFrame(other))
        assert list(rep.index) == ['validation', 'out-of-domain'] and rep.loc['out-of-domain', 'n'] == 12
        assert np.isfinite(rep['loss']).all()

def test_dicom_dataloaders_harmonize_argument(mixed):
    from fastdcm.data import DicomDataLoaders
    d, f = mixed
    df = pd.DataFrame(dict(fname=[str(f[k]) for k in ('dcm', 'a8', 'a16', 'dcm', 'a8', 'a16')], label=list('ababab'),
                           PatientID=[f'P{i}' for i in range(6)]))
    for h in ('histeq', Harmonize('percentile', body=True)):
        dls = DicomDataLoaders.from_df(df, valid_pct=0.34, seed=0, bs=2, harmonize=h, num_workers=0)
        hz = [t for t in dls.after_batch.fs if isinstance(t, Harmonize)]
        assert len(hz) == 1 and hz[0].method == (h if isinstance(h, str) else h.method)
        x, _ = dls.train.one_batch()
        assert x.windows and 0 <= float(x.min()) and float(x.max()) <= 1
    plain = DicomDataLoaders.from_df(df, valid_pct=0.34, seed=0, bs=2, harmonize='none', num_workers=0)
    assert not [t for t in plain.after_batch.fs if isinstance(t, Harmonize)]
    with pytest.raises(ValueError, match='either `windows` or `harmonize`'):
        DicomDataLoaders.from_df(df, valid_pct=0.34, seed=0, windows=['auto'], harmonize='histeq')
