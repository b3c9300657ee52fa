"""Whole-epoch benchmark: one CPU epoch of `vision_learner(resnet18, pretrained=False)` on the same CT files through

(a)  fastdcm: `DicomBlock` + `DicomResize`, batch `Window(['lungs', 'mediastinum', 'auto'])` + `dicom_aug_transforms`,
     decoded by pydicom (the compiled backend switched off);
(a+) the same with the compiled backend (`fastdcm.backend`, `pip install fastdcm[fast]`) reading the files, when installed;
(b)  fastai.medical.imaging's tutorial DataBlock: `ImageBlock(cls=PILDicom)`, `Resize`, `aug_transforms`;
(c)  (a) with a warm `DecodeCache`;
(d)  8-bit PNG exports of the same files (window 'auto', written before timing) through `ImageDataLoaders`.

For each: the epoch's wall time (`learn.fit(1)`: training and validation, a fresh model; best of `--rounds`) and a
data-only pass over the same two loaders (batch transforms included; best of 2 after a warm-up pass that also fills
(c)'s cache); the data share is their ratio. Goal (issue 13): (a) no slower than (b), data
share of (a) under 10%. Loaders use `num_workers=0` (the same for all; the machine has 2 cores). Not run in CI.

The default is small enough for a few minutes on 2 CPU cores; the issue's run is

    python bench/epoch.py --n 128 --size 512 --px 224      # 128 CT files of 512 x 512, trained at 224 px, bs 16
    python bench/epoch.py                                   # default: 48 files of 256 x 256 at 96 px
"""
import argparse, contextlib, shutil, tempfile, time, warnings
from pathlib import Path
import numpy as np, pandas as pd, torch
from PIL import Image
from fastai.vision.all import (DataBlock, ImageBlock, CategoryBlock, ColReader, RandomSplitter, Resize, aug_transforms,
                               ImageDataLoaders, resnet18, set_seed, accuracy)
from fastai.medical.imaging import PILDicom
import fastdcm.pixels as pixels
from fastdcm import backend
from fastdcm.synth import synth_dicom
from fastdcm.transforms import DicomBlock, DicomResize
from fastdcm.data import DicomColReader, PatientSplitter
from fastdcm.augment import Window, dicom_aug_transforms
from fastdcm.cache import DecodeCache
from fastdcm.learner import vision_learner

WINDOWS = ['lungs', 'mediastinum', 'auto']

def make_files(folder, n, size):
    "n CT files (a nodule in every other one: the label), 4 per patient."
    rows = []
    for i in range(n):
        finding = bool(i % 2)
        fn = synth_dicom(folder/f'ct{i:04d}.dcm', modality='CT', size=size, seed=i, finding=finding, patient_id=f'P{i // 4:04d}')
        rows.append(dict(fname=str(fn), label='nodule' if finding else 'clear', PatientID=f'P{i // 4:04d}'))
    return pd.DataFrame(rows)

def export_png8(df, folder):
    "8-bit PNGs of the files (window 'auto' = the file's own min..max at the display stage), as many pipelines do before training."
    out = df.copy()
    names = []
    for fn in df.fname:
        x = pixels.dicom_pixels(fn, 'display')
        p = folder/(Path(fn).stem + '.png')
        Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8)).save(p)
        names.append(str(p))
    out['fname'] = names
    return out

@contextlib.contextmanager
def backend_switched(on:bool):
    "Run with the compiled backend reading the files (`on`) or not, whether or not `fastdcm.pixels` is wired to it yet."
    orig_load, orig_backend = pixels._load, backend.load
    try:
        if not on: backend.load = lambda *a, **k: None   # the backend declines everything: pydicom's path
        elif 'backend' not in pixels._load.__code__.co_names:   # pixels not wired yet: wire it as proposed for `_load`
            def _load(src, frame=None, header=None):
                if header is None:
                    res = orig_backend(src, frame)
                    if res is not None: return (*res, pixels._fname(src))
                return orig_load(src, frame, header)
            pixels._load = _load
        yield
    finally: pixels._load, backend.load = orig_load, orig_backend

def fastdcm_dls(df, px, bs, seed, cache=None):
    dblock = DataBlock(blocks=(DicomBlock(cache=cache), CategoryBlock), get_x=DicomColReader('fname'), get_y=ColReader('label'),
                       splitter=PatientSplitter(0.25, seed=seed), item_tfms=DicomResize(px),
                       batch_tfms=[Window(WINDOWS), *dicom_aug_transforms()])
    return dblock.dataloaders(df, bs=bs, num_workers=0)

def fastai_medical_dls(df, px, bs, seed):
    "fastai's medical imaging tutorial: `ImageBlock(cls=PILDicom)`, then vision's `Resize` and `aug_transforms`."
    dblock = DataBlock(blocks=(ImageBlock(cls=PILDicom), CategoryBlock), get_x=ColReader('fname'), get_y=ColReader('label'),
                       splitter=RandomSplitter(0.25, seed=seed), item_tfms=Resize(px), batch_tfms=aug_transforms(size=px))
    return dblock.dataloaders(df, bs=bs, num_workers=0)

def png_dls(df, px, bs, seed):
    return ImageDataLoaders.from_df(df, path='/', fn_col='fname', label_col='label', valid_pct=0.25, seed=seed, item_tfms=Resize(px),
                                    batch_tfms=aug_transforms(size=px), bs=bs, num_workers=0)

def data_pass(dls):
    "Seconds to draw every batch of the training and validation loaders (decode, item and batch transforms)."
    t0 = time.perf_counter()
    for dl in (dls.train, dls.valid):
        for _ in dl: pass
    return time.perf_counter() - t0

def epoch(dls, seed):
    "Seconds for one epoch (`fit(1)`: training and validation) of a fresh resnet18."
    set_seed(seed, reproducible=True)
    n_in = dls.one_batch()[0].shape[1]
    learn = vision_learner(dls, resnet18, pretrained=False, n_in=n_in, metrics=accuracy)
    with learn.no_bar(), learn.no_logging():
        t0 = time.perf_counter()
        learn.fit(1, 1e-3)
        return time.perf_counter() - t0

def main(n=48, size=256, px=96, bs=16, seed=0, rounds=1):
    folder = Path(tempfile.mkdtemp(prefix='fastdcm_epoch_'))
    try:
        print(f'{n} CT files of {size} x {size}, trained at {px} px, bs {bs}, CPU, {torch.get_num_threads()} torch threads, '
              f'num_workers=0; epoch: best of {rounds}, data-only pass: best of 2 after a warm-up pass')
        (folder/'dcm').mkdir(); (folder/'png').mkdir()
        df = make_files(folder/'dcm', n, size)
        png = export_png8(df, folder/'png')
        for fn in df.fname: Path(fn).read_bytes()   # warm the OS cache
        cache = DecodeCache(folder/'cache')
        runs = [('(a)  fastdcm, pydicom decode', lambda: fastdcm_dls(df, px, bs, seed), False)]
        if backend.available(): runs.append(('(a+) fastdcm, compiled backend', lambda: fastdcm_dls(df, px, bs, seed), True))
        runs += [('(b)  fastai.medical PILDicom', lambda: fastai_medical_dls(df, px, bs, seed), False),
                 ('(c)  fastdcm, DecodeCache warm', lambda: fastdcm_dls(df, px, bs, seed, cache=cache), False),
                 ('(d)  8-bit PNG, ImageDataLoaders', lambda: png_dls(png, px, bs, seed), False)]
        res = {}
        for name, make, fast in runs:
            with backend_switched(fast), warnings.catch_warnings():
                warnings.simplefilter('ignore')
                dls = make()
                data_pass(dls)   # one-time costs out of the way (and (c)'s cache filled): the timed passes find it warm
                t_data = min(data_pass(dls) for _ in range(2))
                t_epoch = min(epoch(dls, seed) for _ in range(rounds))
            res[name] = (t_epoch, t_data)
            print(f'{name:34s} epoch {t_epoch:7.2f} s   data-only pass {t_data:6.2f} s   data share {t_data / t_epoch:6.1%}', flush=True)
        a, b = res['(a)  fastdcm, pydicom decode'], res['(b)  fastai.medical PILDicom']
        print(f'(a) epoch / (b) epoch: {a[0] / b[0]:.2f} (goal <= 1); (a) data share {a[1] / a[0]:.1%} (goal < 10%)')
        if '(a+) fastdcm, compiled backend' in res:
            f = res['(a+) fastdcm, compiled backend']
            print(f'(a+) epoch / (b) epoch: {f[0] / b[0]:.2f}; (a+) data share {f[1] / f[0]:.1%}; data pass (a)/(a+): {a[1] / f[1]:.2f}x')
    finally: shutil.rmtree(folder, ignore_errors=True)

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--n', type=int, default=48, help='number of CT files')
    p.add_argument('--size', type=int, default=256, help='rows = columns of each file')
    p.add_argument('--px', type=int, default=96, help='training image size')
    p.add_argument('--bs', type=int, default=16)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--rounds', type=int, default=1, help='epochs timed per loader (the best is printed)')
    a = p.parse_args()
    main(a.n, a.size, a.px, a.bs, a.seed, a.rounds)
