"""Batch windowing + augmentation vs the same work per item, on CPU (or --device cuda).

Workload: 64 CT slices of 512 x 512 in HU -> 3 windows (brain, subdural, bone) + augmentation
(flip, rotate, zoom, warp; brightness/contrast after the windows).

- batch  : fastdcm, one call on the (64, 1, 512, 512) batch: geometry on the modality values (fastai's draws;
           `TensorDicom.affine_coord` builds one projective grid per image), then `Window` (PS3.3 LINEAR)
           -> 3 channels, then lighting.
- item/fastai.medical (the anchor): per item, fastai.medical.imaging's `Tensor.windowed` for each window (the
           classic per-item to_nchan path), stacked to a 3-channel TensorCTScan, then the same augmentation on
           that item (fastai's own lighting code).
- item/fastdcm: the fastdcm transforms themselves, called once per item (batch of 1): isolates what batching buys.

Each figure is the best of `--repeats` rounds, the paths taking turns within each round, all in this one run. Prints seconds and ratios.
On the CPU, Window's and the lighting's output buffers are reused from one call to the next once nothing refers to
them (`fastdcm.augment._reusable`), as they are in training, where each batch is dropped before the next.
Run: python bench/batch_tfms.py [--n 64] [--size 512] [--repeats 3] [--device cpu|cuda] [--threads N]
"""
import argparse, os, time, warnings
import torch
import torch.nn.functional as F
warnings.filterwarnings('ignore')
from fastai.vision.all import Pipeline, aug_transforms, Brightness, Contrast
from fastai.medical.imaging import TensorCTScan  # and patches Tensor.windowed (the anchor)
from fastdcm.transforms import TensorDicom
from fastdcm.augment import Window, dicom_windows

def make_batch(n, size, device):
    "Smooth CT-like slices in HU: air, a body ellipse with soft tissue, bone ring, noise."
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing='ij')
    out = torch.empty(n, 1, size, size)
    for i in range(n):
        a, b = 0.7 + 0.2*torch.rand(1, generator=g), 0.5 + 0.2*torch.rand(1, generator=g)
        r = (xx/a)**2 + (yy/b)**2
        img = torch.where(r < 1, 40., -1000.) + torch.where((r > 0.3) & (r < 0.4), 900., 0.)
        out[i, 0] = img + 20*torch.randn(size, size, generator=g)
    return TensorDicom(out.to(device))

def aug(size):
    return aug_transforms(max_rotate=15, max_zoom=1.2, max_warp=0.2, max_lighting=0.2, p_affine=1., p_lighting=1., size=size)

def timeit(f, repeats, device):
    best = float('inf')
    for _ in range(repeats):
        if device == 'cuda': torch.cuda.synchronize()
        t0 = time.perf_counter(); f()
        if device == 'cuda': torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best

def main():
    p = argparse.ArgumentParser()
    p.add_argument('--n', type=int, default=64); p.add_argument('--size', type=int, default=512)
    p.add_argument('--repeats', type=int, default=3); p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=None, help="torch threads (default: torch's, one per core)")
    a = p.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    names = ['brain', 'subdural', 'bone']
    wins = [dicom_windows[o] for o in names]
    x = make_batch(a.n, a.size, a.device)

    batch_pipe = Pipeline([*aug(a.size), Window(names)], split_idx=0)   # sorted by order: geometry, Window, lighting
    def batch(): return batch_pipe(x)

    item_pipe = Pipeline(aug(a.size), split_idx=0)                        # same augmentation, on 3-channel items
    def item_fastai_medical():
        for i in range(a.n):
            px = x[i, 0].as_subclass(torch.Tensor)
            w3 = torch.stack([px.windowed(w, c) for c, w in wins])        # fastai.medical: windowed(w, l)
            item_pipe(TensorCTScan(w3[None]))                              # fastai.medical's to_nchan type

    def item_fastdcm():
        for i in range(a.n): batch_pipe(x[i:i+1])

    out = batch()
    assert out.shape == (a.n, 3, a.size, a.size)
    del out                                   # dropped, as a training loop drops each batch
    # the paths take turns within each round, so a change of load on a shared machine hits all of them alike
    t_batch = t_fm = t_fd = float('inf')
    for _ in range(a.repeats):
        t_batch = min(t_batch, timeit(batch, 1, a.device))
        t_fm = min(t_fm, timeit(item_fastai_medical, 1, a.device))
        t_fd = min(t_fd, timeit(item_fastdcm, 1, a.device))
    print(f'device={a.device} threads={torch.get_num_threads()} batch={a.n}x{a.size}x{a.size}, 3 windows + flip/rotate/zoom/warp + lighting'
          + (f'; load average {os.getloadavg()[0]:.2f}' if hasattr(os, 'getloadavg') else ''))
    print(f'batch (fastdcm, one call)          : {t_batch:7.3f} s')
    print(f'per item, fastai.medical windowed  : {t_fm:7.3f} s   ratio {t_fm/t_batch:5.2f}x  (anchor)')
    print(f'per item, fastdcm transforms       : {t_fd:7.3f} s   ratio {t_fd/t_batch:5.2f}x')

if __name__ == '__main__': main()
