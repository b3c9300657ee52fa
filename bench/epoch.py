"""Whole-epoch benchmark: one CPU epoch of `vision_learner(resnet18, pretrained=False)` on the same CT files through

(a)  fastdcm: `DicomBlock` + `DicomResize`, batch `Window(['lungs', 'mediastinum', 'auto'])` + `dicom_aug_transforms`,
     decoded by pydicom (the compiled backend switched off);
(a+) the same with the compiled backend (`fastdcm.backend`, `pip install fastdcm[fast]`) reading the files, when installed;
(b)  fastai.medical.imaging's tutorial DataBlock: `ImageBlock(cls=PILDicom)`, `Resize`, `aug_transforms`;
(a0) (a) without fastdcm's `RecalibrateBN` callback, which fastdcm's `vision_learner` adds when training from scratch:
     before each validation it re-estimates BatchNorm statistics with forward passes (no gradient) on the inputs of
     the epoch's last training batches (4, at most a quarter of the epoch's: here 2 of 6);
(a1) (a) without channels-last: fastdcm's `vision_learner` trains with the weights in channels-last layout on the CPU
     (fastai's `ChannelsLast` callback), where oneDNN's convolutions run faster; `channels_last=False` turns it off;
(c)  (a) with a warm `DecodeCache`;
(d)  8-bit PNG exports of the same files (window 'auto', written before timing) through `ImageDataLoaders`.

For each: the epoch's wall time (`learn.fit(1)`: training and validation, a fresh model; best of `--rounds`) and a
data-only pass over the same two loaders (batch transforms included; best of 2 after a warm-up pass that also fills
(c)'s cache); the data share is their ratio. Each variant runs in its own process (so (b) and (d) run without
fastdcm imported). Wall and CPU seconds of that process are both printed; shares and ratios use CPU seconds, which
other work on a shared machine disturbs less than wall time (`--threads 1` steadies them further: two torch threads
on a contended 2-core machine spin). Goal (issue 13): (a) no slower than (b), data share of (a) under 10%. Loaders
use `num_workers=0` (the same for all; the machine has 2 cores). Not run in CI.

The default is the issue's run, about 2 minutes on 2 CPU cores (`--threads 1` for steadier CPU times); a quick one:

    python bench/epoch.py                                   # 128 CT files of 512 x 512, trained at 224 px, bs 16
    python bench/epoch.py --n 48 --size 256 --px 96         # smaller and faster
"""
import argparse, contextlib, json, shutil, subprocess, sys, tempfile, time, warnings
from pathlib import Path
import numpy as np, pandas as pd, torch
from PIL import Image
from fastai.vision.all import (DataBlock, ImageBlock, CategoryBlock, ColReader, RandomSplitter, Resize, aug_transforms,
                               ImageDataLoaders, resnet18, set_seed, accuracy)
# fastdcm is imported only where a variant uses it: each variant runs in its own process, so (b) and (d) are fastai
# as users run it without fastdcm (importing fastdcm changes what fastai.medical's PILDicom batches are)

WINDOWS = ['lungs', 'mediastinum', 'auto']

def make_files(folder, n, size):
    "n CT files (a nodule in every other one: the label), 4 per patient."
    from fastdcm.synth import synth_dicom
    rows = []
    for i in range(n):
        finding = bool(i % 2)
        fn = synth_dicom(folder/f'ct{i:04d}.dcm', modality='CT', size=size, seed=i, finding=finding, patient_id=f'P{i // 4:04d}')
        rows.append(dict(fname=str(fn), label='nodule' if finding else 'clear', PatientID=f'P{i // 4:04d}'))
    return pd.DataFrame(rows)

def export_png8(df, folder):
    "8-bit PNGs of the files (window 'auto' = the file's own min..max at the display stage), as many pipelines do before training."
    from fastdcm.pixels import dicom_pixels
    out = df.copy()
    names = []
    for fn in df.fname:
        x = dicom_pixels(fn, 'display')
        p = folder/(Path(fn).stem + '.png')
        Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8)).save(p)
        names.append(str(p))
    out['fname'] = names
    return out

from backend import backend_switched   # bench/backend.py's: the compiled backend reading files, or declining all

def fastdcm_dls(df, px, bs, seed, cache=None):
    from fastdcm.transforms import DicomBlock, DicomResize
    from fastdcm.data import DicomColReader, PatientSplitter
    from fastdcm.augment import Window, dicom_aug_transforms
    dblock = DataBlock(blocks=(DicomBlock(cache=cache), CategoryBlock), get_x=DicomColReader('fname'), get_y=ColReader('label'),
                       splitter=PatientSplitter(0.25, seed=seed), item_tfms=DicomResize(px),
                       batch_tfms=[Window(WINDOWS), *dicom_aug_transforms()])
    return dblock.dataloaders(df, bs=bs, num_workers=0)

def fastai_medical_dls(df, px, bs, seed):
    "fastai's medical imaging tutorial: `ImageBlock(cls=PILDicom)`, then vision's `Resize` and `aug_transforms`."
    from fastai.medical.imaging import PILDicom
    dblock = DataBlock(blocks=(ImageBlock(cls=PILDicom), CategoryBlock), get_x=ColReader('fname'), get_y=ColReader('label'),
                       splitter=RandomSplitter(0.25, seed=seed), item_tfms=Resize(px), batch_tfms=aug_transforms(size=px))
    return dblock.dataloaders(df, bs=bs, num_workers=0)

def png_dls(df, px, bs, seed):
    return ImageDataLoaders.from_df(df, path='/', fn_col='fname', label_col='label', valid_pct=0.25, seed=seed, item_tfms=Resize(px),
                                    batch_tfms=aug_transforms(size=px), bs=bs, num_workers=0)

def _timed(f):
    "(wall seconds, CPU seconds of this process) that `f()` takes: on a shared machine the CPU time is the steadier figure."
    w0, c0 = time.perf_counter(), time.process_time()
    f()
    return time.perf_counter() - w0, time.process_time() - c0

def data_pass(dls):
    "(wall, CPU) seconds to draw every batch of the training and validation loaders (decode, item and batch transforms)."
    def run():
        for dl in (dls.train, dls.valid):
            for _ in dl: pass
    return _timed(run)

def epoch(dls, seed, vision_learner, recalibrate=True, **kwargs):
    "(wall, CPU) seconds for one epoch (`fit(1)`: training and validation) of a fresh resnet18; `recalibrate=False` takes fastdcm's `RecalibrateBN` callback out; `kwargs` go to `vision_learner`."
    set_seed(seed, reproducible=True)
    n_in = dls.one_batch()[0].shape[1]
    learn = vision_learner(dls, resnet18, pretrained=False, n_in=n_in, metrics=accuracy, **kwargs)
    if not recalibrate: learn.remove_cbs([c for c in learn.cbs if type(c).__name__ == 'RecalibrateBN'])
    with learn.no_bar(), learn.no_logging(): return _timed(lambda: learn.fit(1, 1e-3))

VARIANTS = {'a': '(a)  fastdcm, pydicom decode', 'a0': '(a0) (a) without RecalibrateBN', 'a1': '(a1) (a) without channels-last',
            'a+': '(a+) fastdcm, compiled backend', 'b': '(b)  fastai.medical PILDicom',
            'c': '(c)  fastdcm, DecodeCache warm', 'd': '(d)  8-bit PNG, ImageDataLoaders'}

def run_variant(v, folder, px, bs, seed, rounds):
    "Time variant `v` on the files in `folder` (this process); returns ((epoch wall, CPU), (data pass wall, CPU))."
    folder = Path(folder)
    df, png = pd.read_csv(folder/'dcm.csv'), pd.read_csv(folder/'png.csv')
    if v in ('b', 'd'): from fastai.vision.all import vision_learner
    else: from fastdcm.learner import vision_learner
    with backend_switched(v == 'a+') if v in ('a', 'a0', 'a1', 'a+', 'c') else contextlib.nullcontext(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        if v == 'b': dls = fastai_medical_dls(df, px, bs, seed)
        elif v == 'd': dls = png_dls(png, px, bs, seed)
        else:
            from fastdcm.cache import DecodeCache
            dls = fastdcm_dls(df, px, bs, seed, cache=DecodeCache(folder/'cache') if v == 'c' else None)
        data_pass(dls)   # one-time costs out of the way (and (c)'s cache filled): the timed passes find it warm
        t_data = min((data_pass(dls) for _ in range(2)), key=lambda t: t[1])
        kw = dict(channels_last=False) if v == 'a1' else {}
        t_epoch = min((epoch(dls, seed, vision_learner, recalibrate=v != 'a0', **kw) for _ in range(rounds)), key=lambda t: t[1])
    return t_epoch, t_data

def main(n=128, size=512, px=224, bs=16, seed=0, rounds=1, threads=None):
    from fastdcm import backend
    folder = Path(tempfile.mkdtemp(prefix='fastdcm_epoch_'))
    try:
        (folder/'dcm').mkdir(); (folder/'png').mkdir()
        df = make_files(folder/'dcm', n, size)
        export_png8(df, folder/'png').to_csv(folder/'png.csv', index=False)
        df.to_csv(folder/'dcm.csv', index=False)
        for fn in df.fname: Path(fn).read_bytes()   # warm the OS cache
        print(f'{n} CT files of {size} x {size}, trained at {px} px, bs {bs}, CPU, torch threads: {threads or "default"}, '
              f'num_workers=0, each loader in its own process; epoch: best of {rounds}; data-only pass: best of 2 after a '
              f'warm-up pass', flush=True)
        res = {}
        for v, name in VARIANTS.items():
            if v == 'a+' and not backend.available(): continue
            cmd = [sys.executable, __file__, '--variant', v, '--folder', str(folder), '--px', str(px), '--bs', str(bs),
                   '--seed', str(seed), '--rounds', str(rounds)] + (['--threads', str(threads)] if threads else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode: sys.exit(f'{name} failed:\n{out.stderr[-3000:]}')
            res[v] = json.loads(out.stdout.strip().splitlines()[-1])
            (ew, ec), (dw, dc) = res[v]
            print(f'{name:34s} epoch {ew:7.2f} s wall {ec:7.2f} s CPU   data-only pass {dw:6.2f} s wall {dc:6.2f} s CPU   '
                  f'data share {dc / ec:6.1%} (CPU)', flush=True)
        share = lambda v: res[v][1][1] / res[v][0][1]
        vs_b = lambda v: res[v][0][1] / res['b'][0][1]
        print(f'CPU time: (a) epoch / (b) epoch {vs_b("a"):.2f} (goal <= 1); (a) data share {share("a"):.1%} (goal < 10%); '
              f'without RecalibrateBN (a0) / (b) {vs_b("a0"):.2f}; without channels-last (a1) / (b) {vs_b("a1"):.2f}')
        if 'a+' in res:
            print(f'CPU time: (a+) epoch / (b) epoch {vs_b("a+"):.2f}; (a+) data share {share("a+"):.1%}; '
                  f'data pass (a) / (a+) {res["a"][1][1] / res["a+"][1][1]:.2f}x')
    finally: shutil.rmtree(folder, ignore_errors=True)

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--n', type=int, default=128, help='number of CT files')
    p.add_argument('--size', type=int, default=512, help='rows = columns of each file')
    p.add_argument('--px', type=int, default=224, help='training image size')
    p.add_argument('--bs', type=int, default=16)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--rounds', type=int, default=1, help='epochs timed per loader (the best is printed)')
    p.add_argument('--threads', type=int, default=None, help="torch threads (default: torch's); 1 gives steadier CPU times on a shared machine")
    p.add_argument('--variant', choices=list(VARIANTS), help=argparse.SUPPRESS)   # internal: time one variant on --folder
    p.add_argument('--folder', help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    if a.variant: print(json.dumps(run_variant(a.variant, a.folder, a.px, a.bs, a.seed, a.rounds)))
    else: main(a.n, a.size, a.px, a.bs, a.seed, a.rounds, a.threads)
