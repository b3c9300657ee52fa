#!/usr/bin/env bash
# The GPU benches as one prepared device run: the device machine's python has torch but not
# fastai/pydicom/MONAI/dicomsdl, so their wheels travel in .gpuwheels (fetch them here first:
#   pip download --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 -d .gpuwheels \
#       fastai fastcore fastdownload 'fastprogress<1.1' fasttransform plum-dispatch beartype pydicom pylibjpeg \
#       pylibjpeg-libjpeg pylibjpeg-openjpeg kornia kornia_rs monai dicomsdl pyjpegls dicom-anonymizer \
#       dask distributed tornado tblib zict locket partd
# (fastprogress 1.1 needs python-fasthtml and its web stack; 1.0.3 is enough for fastai)
# ), fastdcm is used from the working tree. Each bench has its own time limit; logs go to $OUT (or ./bench/out).
# Usage: bash bench/device.sh [volume] [batch] [decode] [scale] [index] [epoch]   (default: volume batch decode)
set -u
OUT=${OUT:-bench/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index .gpuwheels/*.whl 2>&1 | tail -3
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
python3 -c "import torch, fastdcm.all; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
want=${*:-volume batch decode}
for b in $want; do
  case $b in
    volume) timeout 150 python3 bench/volume_batch.py --device cuda --runs 3 --repeats 5 2>&1 | tee "$OUT/volume_batch_cuda.txt"
            timeout 100 python3 bench/volume_batch.py --device cpu --runs 2 2>&1 | tee "$OUT/volume_batch_cpu.txt" ;;
    batch)  timeout 100 python3 bench/batch_tfms.py --device cuda --repeats 5 2>&1 | tee "$OUT/batch_tfms_cuda.txt"
            timeout 100 python3 bench/batch_tfms.py --device cpu --threads 2 2>&1 | tee "$OUT/batch_tfms_cpu2.txt" ;;
    decode) timeout 150 python3 bench/decode.py --n 200 --n-compressed 40 --rounds 3 2>&1 | tee "$OUT/decode.txt" ;;
    scale)  timeout 200 python3 bench/scale.py --n 2000 --repeat 3 2>&1 | tee "$OUT/scale.txt" ;;
    index)  timeout 120 python3 bench/index.py --n 2000 --repeat 3 2>&1 | tee "$OUT/index.txt" ;;
    epoch)  timeout 200 python3 bench/epoch.py 2>&1 | tee "$OUT/epoch.txt" ;;
  esac
done
