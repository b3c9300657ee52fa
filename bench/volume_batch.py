"""3-D batch augmentation on the batch's device vs the same per item, on CPU (or --device cuda).

Workload: 4 CT volumes of 1 x 64 x 128 x 128 in HU with their label masks -> flips, rotation, zoom (one affine per
item), intensity scale/shift/noise in HU.

- batch       : fastdcm.volume_data, one call of `VolumeAffine` + `VolumeIntensity` on the (4, 1, 64, 128, 128) batch
                and its (4, 64, 128, 128) mask: one `F.affine_grid`, one trilinear and one nearest `F.grid_sample`.
- item/fastdcm: the same transforms called once per item (batches of 1): what batching itself buys.
- item/monai  : the anchor: MONAI's dictionary transforms per item, as a MONAI/fastMONAI pipeline runs them in its
                data loader (RandFlipd on each axis, RandAffined with bilinear image / nearest label,
                RandScaleIntensityd, RandShiftIntensityd, RandGaussianNoised), same ranges, all applied (prob 1).
- item/scipy  : per item, `scipy.ndimage.affine_transform` (order 1 image, order 0 mask) with the same kind of
                affine, then intensity in numpy: a lean hand-written per-item CPU path.

Goal (issue 9): batch >= 3x the per-item pipeline on CPU. The anchor for that goal is item/monai, the per-item
path a MONAI/fastMONAI data loader runs. item/fastdcm isolates what batching alone buys with the same kernels:
torch's CPU grid_sample spreads a batch over the threads, so on 2 cores the ceiling there is about 2x plus the
per-call overhead; on 16 cores, and on a GPU, it is larger.

Each figure is the best of `--repeats` rounds, the paths interleaved within each round, all measured in this one run; with --runs N the whole comparison is
repeated N times and the spread of the ratios printed. Prints seconds and ratios.
Run: python bench/volume_batch.py [--n 4] [--shape 64 128 128] [--repeats 3] [--runs 3] [--device cpu]
"""
import argparse, os, time, warnings, math
import numpy as np, torch
warnings.filterwarnings('ignore')
from scipy import ndimage
from fastdcm.volume_data import TensorVolume, TensorMask3D, VolumeAffine, VolumeIntensity, volume_affines

def make_batch(n, shape, device):
    "Smooth CT-like volumes in HU (air, body ellipsoid, a bright sphere) and the sphere as mask."
    g = torch.Generator().manual_seed(0)
    D, H, W = shape
    z, y, x = torch.meshgrid(*(torch.linspace(-1, 1, s) for s in shape), indexing='ij')
    body = (x/0.8)**2 + (y/0.6)**2 <= 1
    out = torch.full((n, 1, *shape), -1000.)
    out[:, 0][:, body] = 40.
    masks = torch.zeros((n, *shape), dtype=torch.long)
    for i in range(n):
        c = torch.rand(3, generator=g)*0.6 - 0.3
        sph = (z - c[0])**2 + (y - c[1])**2 + (x - c[2])**2 <= 0.15**2
        out[i, 0][sph] = 150.; masks[i][sph] = 1
    out += torch.randn(out.shape, generator=g)*10
    return TensorVolume(out.to(device), spacing=(1., 1., 1.)), TensorMask3D(masks.to(device), spacing=(1., 1., 1.))

def batch_aug(x, m, tfms):
    for t in tfms: x, m = t((x, m), split_idx=0)
    return x, m

def per_item_fastdcm(x, m, tfms):
    outs = [batch_aug(x[i:i+1], m[i:i+1], tfms) for i in range(x.shape[0])]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

def per_item_scipy(x, m):
    "Per item, on the CPU: the same kind of affine (flips, rotation, zoom) by scipy, then intensity in numpy."
    xs, ms = x.cpu().numpy(), m.cpu().numpy()
    shape = xs.shape[-3:]
    theta = volume_affines(xs.shape[0], shape, p_affine=1.).numpy()
    c = (np.array(shape) - 1)/2
    rng = np.random.default_rng(0)
    out_x, out_m = np.empty_like(xs), np.empty_like(ms)
    for i in range(xs.shape[0]):
        a = theta[i, :, :3][::-1, ::-1]              # affine_grid's (x, y, z) -> array axes (z, y, x); normalised ~ voxels here
        off = c - a @ c
        out_x[i, 0] = ndimage.affine_transform(xs[i, 0], a, off, order=1, mode='nearest')
        out_m[i] = ndimage.affine_transform(ms[i], a, off, order=0, mode='nearest')
        out_x[i, 0] = out_x[i, 0]*rng.uniform(0.95, 1.05) + rng.uniform(-20, 20) + rng.normal(0, 10, shape).astype(np.float32)
    return out_x, out_m

def monai_item_pipeline(device):
    "MONAI's per-item dictionary transforms with the same ranges as the batch transforms (None when MONAI is missing)."
    try: from monai import transforms as mt
    except ImportError: return None
    k = ['image', 'label']
    return mt.Compose([*[mt.RandFlipd(k, prob=0.5, spatial_axis=a) for a in range(3)],
                       mt.RandAffined(k, prob=1., rotate_range=[math.radians(10)]*3, scale_range=[0.1]*3, mode=['bilinear', 'nearest'],
                                      padding_mode='border', device=torch.device(device)),
                       mt.RandScaleIntensityd('image', factors=0.05, prob=1.), mt.RandShiftIntensityd('image', offsets=20., prob=1.),
                       mt.RandGaussianNoised('image', std=10., prob=1.)])

def per_item_monai(x, m, pipe):
    outs = [pipe({'image': x[i].as_subclass(torch.Tensor), 'label': m[i:i+1].as_subclass(torch.Tensor).float()}) for i in range(x.shape[0])]
    return torch.stack([torch.as_tensor(o['image']) for o in outs]), torch.stack([torch.as_tensor(o['label']) for o in outs])

def best(f, repeats, device):
    ts = []
    for _ in range(repeats):
        if device.startswith('cuda'): torch.cuda.synchronize()
        t = time.perf_counter(); f()
        if device.startswith('cuda'): torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return min(ts)

def main():
    p = argparse.ArgumentParser()
    p.add_argument('--n', type=int, default=4); p.add_argument('--shape', type=int, nargs=3, default=[64, 128, 128])
    p.add_argument('--repeats', type=int, default=3); p.add_argument('--runs', type=int, default=1)
    p.add_argument('--device', default='cpu')
    a = p.parse_args()
    x, m = make_batch(a.n, tuple(a.shape), a.device)
    tfms = [VolumeAffine(p_flip=0.5, max_rotate=10., max_scale=0.1, p_affine=1.), VolumeIntensity(p=1.)]
    batch_aug(x, m, tfms)   # warm-up
    pipe = monai_item_pipeline(a.device)
    if pipe is not None: per_item_monai(x, m, pipe)   # warm-up
    ratios = {'item/monai': [], 'item/fastdcm': [], 'item/scipy': []}
    paths = {'batch': lambda: batch_aug(x, m, tfms), 'item/fastdcm': lambda: per_item_fastdcm(x, m, tfms)}
    if pipe is not None: paths['item/monai'] = lambda: per_item_monai(x, m, pipe)
    if a.device == 'cpu': paths['item/scipy'] = lambda: per_item_scipy(x, m)
    for run in range(a.runs):
        ts = {k: float('inf') for k in paths}
        for _ in range(a.repeats):      # interleaved: each path timed once per round, so a load change hits all of them
            for k, f in paths.items(): ts[k] = min(ts[k], best(f, 1, a.device))
        tb = ts.pop('batch')
        for k, t in ts.items(): ratios[k].append(t/tb)
        print(f'run {run+1}: batch {tb:.3f} s | ' + ' | '.join(f'{k} {t:.3f} s ({t/tb:.2f}x)' for k, t in ts.items()) +
              f'  [{a.n} x 1 x {" x ".join(map(str, a.shape))}, {a.device}, {torch.get_num_threads()} threads, '
              f'load {os.getloadavg()[0]:.1f}]')
    if a.runs > 1:
        print('ratio of batch over ' + '; '.join(f'{k}: min {min(r):.2f}x, median {np.median(r):.2f}x, max {max(r):.2f}x'
                                                for k, r in ratios.items() if r))

if __name__ == '__main__': main()
