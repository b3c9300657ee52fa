"""Train on PNG, test on DICOM (and the inverse): which preprocessing makes a chest-radiograph classifier transfer.

Two synthetic sites of frontal chest radiographs with the same learnable finding (a bright round lesion, half the
images), one image per patient:

- site A, 8-bit foreign images: each went through its own chain before we got it -- an unknown window (random
  percentiles), a random gamma tone curve (0.6-1.6), detector size 80 px, noise, JPEG at quality 75-95; 30% were
  stored inverted (bone dark), and the dataset's CSV says which (`inverted` column, as dataset authors provide).
- site B, DICOM: CR/DX, MONOCHROME1 and MONOCHROME2 mixed, 12 or 16 bits stored, 64 px, written by `fastdcm.synth`.

Routes (each trained on one site's training split, evaluated on its own validation split -- in-domain -- and on
the whole other site -- out-of-domain):

- naive: PNG through fastai's `ImageBlock` (PIL, /255, RGB) and DICOM through `fastai.medical.imaging`'s `PILDicom`
  converted to RGB (the tutorial route: 16-bit values squashed by PIL);
- fastdcm, window only: `DicomBlock` for both, DICOM through an 'auto' window + presentation, PNG as [0,1];
- fastdcm + `Harmonize(method, body=...)`: 'percentile', 'clahe', 'histeq', each with and without body masking;
- ablation of the harmonised route: no presentation handling (MONOCHROME1 and declared-inverted PNGs left as
  stored); 'window only' is the same route without equalisation, and 'histeq' without body masking.

Prints ROC AUC and accuracy, mean and spread (min-max) over `--seeds` seeds, for A->B and B->A with the
in-domain references. CPU, a few minutes with the defaults.
Run: python bench/domain.py [--n 100] [--seeds 3] [--epochs 5] [--routes 'NAME;NAME']
"""
import argparse, io, time, warnings
from pathlib import Path
import tempfile
import numpy as np, pandas as pd, torch
from PIL import Image
warnings.filterwarnings('ignore')
from sklearn.metrics import roc_auc_score
from fastai.vision.all import (DataBlock, CategoryBlock, ImageBlock, ColReader, IndexSplitter, Resize, PILImage,
                               resnet18, set_seed, noop)
from fastai.medical.imaging import PILDicom
from fastdcm.synth import synth_image, synth_dicom
from fasttransform import Transform
from fastdcm.transforms import DicomBlock, TensorDicom
from fastdcm.augment import Window, Harmonize
from fastdcm.learner import vision_learner

SIZE = 64

def site_a(path, n, seed):
    "Site A: 8-bit JPEG radiographs from unknown processing chains; CSV with label and `inverted`."
    rng = np.random.default_rng([seed, 1]); rows = []
    for i in range(n):
        finding = i % 2 == 1
        d = synth_image('chest', size=80, finding=finding, seed=10_000*seed + i)
        lo, hi = np.percentile(d, [rng.uniform(0, 8), rng.uniform(92, 100)])
        v = np.clip((d - lo) / max(hi - lo, 1e-3), 0, 1) ** rng.uniform(0.6, 1.6) + rng.normal(0, 0.015, d.shape)
        inverted = bool(rng.random() < 0.3)
        if inverted: v = 1 - v
        buf = io.BytesIO()
        Image.fromarray(np.clip(v*255, 0, 255).round().astype(np.uint8)).save(buf, format='JPEG', quality=int(rng.integers(75, 96)))
        fn = Path(path)/f'a{i:04d}.jpg'; fn.write_bytes(buf.getvalue())
        rows.append(dict(fname=str(fn), label='finding' if finding else 'normal', inverted=inverted, site='A'))
    return pd.DataFrame(rows)

def site_b(path, n, seed):
    "Site B: DICOM CR/DX, MONOCHROME1/2, 12-16 bits."
    rng = np.random.default_rng([seed, 2]); rows = []
    for i in range(n):
        finding = i % 2 == 1
        d = synth_image('chest', size=SIZE, finding=finding, seed=20_000*seed + i)
        pi = ['MONOCHROME1', 'MONOCHROME2'][int(rng.integers(2))]
        bits = int(rng.choice([12, 16]))
        fn = synth_dicom(Path(path)/f'b{i:04d}.dcm', d, modality=['CR', 'DX'][int(rng.integers(2))], photometric=pi,
                         bits_stored=bits, signed=False, seed=i, patient_id=f'B{seed}-{i}')
        rows.append(dict(fname=str(fn), label='finding' if finding else 'normal', inverted=False, site='B'))
    return pd.DataFrame(rows)

class PILDicomRGB(PILDicom):
    "fastai.medical.imaging's `PILDicom`, converted to RGB as a user feeding an ImageNet-style model would."
    @classmethod
    def create(cls, fn, mode=None): return PILDicom.create(fn, mode='RGB')

def _naive_block(site): return ImageBlock if site == 'A' else ImageBlock(cls=PILDicomRGB)

def _dls(df, site, route, valid_idx, bs=16):
    "DataLoaders of one site for one route (items: the rows, so `inverted` reaches `open_image`)."
    vocab = ['finding', 'normal']
    if route == 'naive':
        blocks, get_x, batch_tfms = (_naive_block(site), CategoryBlock(vocab=vocab)), ColReader('fname'), []
    else:
        blocks, get_x = (DicomBlock(), CategoryBlock(vocab=vocab)), noop
        batch_tfms = route if isinstance(route, list) else [route] if not isinstance(route, str) else [Window(['auto'])]
        if isinstance(route, list): df = df.assign(inverted=False)    # the ablation also ignores the declared inversions
    return DataBlock(blocks=blocks, get_x=get_x, get_y=ColReader('label'), splitter=IndexSplitter(valid_idx),
                     item_tfms=Resize(SIZE), batch_tfms=batch_tfms).dataloaders(df, bs=bs, num_workers=0)

def _scores(learn, dl):
    with learn.no_bar(): probs, targs = learn.get_preds(dl=dl)
    p = probs[:, 0].numpy(); y = (targs.numpy() == 0)       # vocab[0] == 'finding'
    return roc_auc_score(y, p), float(((p > 0.5) == y).mean())

def run(route, train_df, test_df, train_site, test_site, seed, epochs):
    "Train on `train_df` (80/20 split), return in-domain and out-of-domain (AUC, accuracy)."
    set_seed(seed, reproducible=True)
    n = len(train_df); valid_idx = list(range(0, n, 5))
    dls = _dls(train_df, train_site, route, valid_idx)
    learn = vision_learner(dls, resnet18, pretrained=False)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, 3e-3)
    ind = _scores(learn, dls.valid)
    if route == 'naive':   # the other site through its own naive pipeline (all but one item in 'valid')
        ood_dl = _dls(test_df, test_site, route, list(range(1, len(test_df)))).valid
    else: ood_dl = learn.dls.test_dl(test_df, with_labels=True)   # the same pipeline: DicomBlock opens both kinds
    return ind, _scores(learn, ood_dl)

class DropPresentation(Transform):
    "Ablation: forget each item's presentation (MONOCHROME1, declared inversion) before harmonising."
    order = 34
    def encodes(self, x:TensorDicom):
        x = TensorDicom(x.as_subclass(torch.Tensor), **x.__dict__); x.inverted = None
        return x

def _no_presentation(tfm): return lambda: [DropPresentation(), tfm]

ROUTES = {
    'naive (ImageBlock PNG / PILDicom)': lambda: 'naive',
    'fastdcm window only': lambda: 'window',
    'Harmonize percentile': lambda: Harmonize('percentile'),
    'Harmonize percentile + body': lambda: Harmonize('percentile', body=True),
    'Harmonize clahe': lambda: Harmonize('clahe'),
    'Harmonize clahe + body': lambda: Harmonize('clahe', body=True),
    'Harmonize histeq': lambda: Harmonize('histeq'),
    'Harmonize histeq + body': lambda: Harmonize('histeq', body=True),
    'ablation: histeq + body, no presentation': _no_presentation(Harmonize('histeq', body=True)),
}

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--n', type=int, default=100, help='images per site')
    ap.add_argument('--seeds', type=int, default=3)
    ap.add_argument('--epochs', type=int, default=5)
    ap.add_argument('--routes', default=None, help='semicolon-separated subset of route names')
    a = ap.parse_args()
    routes = {k: v for k, v in ROUTES.items() if a.routes is None or k in a.routes.split(';')}
    res = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(a.seeds):
            (Path(tmp)/f'{seed}').mkdir()
            A, B = site_a(Path(tmp)/f'{seed}', a.n, seed), site_b(Path(tmp)/f'{seed}', a.n, seed)
            for name, mk in routes.items():
                for tr, te, trs, tes in ((A, B, 'A', 'B'), (B, A, 'B', 'A')):
                    (ia, iacc), (oa, oacc) = run(mk(), tr, te, trs, tes, seed, a.epochs)
                    res.append(dict(route=name, direction=f'{trs}->{tes}', seed=seed, in_auc=ia, in_acc=iacc, out_auc=oa, out_acc=oacc))
                    print(f'seed {seed} {trs}->{tes} {name}: in-domain AUC {ia:.3f}, out-of-domain AUC {oa:.3f} '
                          f'({time.time()-t0:.0f} s)', flush=True)
    df = pd.DataFrame(res)
    spread = lambda s: f'{s.mean():.3f} ({s.min():.3f}-{s.max():.3f})'
    tab = df.groupby(['direction', 'route'], sort=False).agg(in_auc=('in_auc', spread), out_auc=('out_auc', spread),
                                                             out_acc=('out_acc', spread))
    tab['auc_drop'] = df.groupby(['direction', 'route'], sort=False).apply(lambda g: f"{(g.in_auc - g.out_auc).mean():+.3f}")
    pd.set_option('display.width', 200)
    print(tab.to_string())
    print(f'\n{a.n} images per site, {a.seeds} seeds, {a.epochs} epochs, {time.time()-t0:.0f} s')
    return df

if __name__ == '__main__': main()
