"Tests for fastdcm.pixels beyond the notebook: import hygiene, fast path vs pydicom path, bad input, enhanced multi-frame."
import subprocess, sys
from pathlib import Path
import numpy as np, pytest, pydicom
from pydicom.data import get_testdata_file
from fastdcm.core import *
from fastdcm.pixels import *
from fastdcm.pixels import PixelDecodeError, FrameIndexError, _load

CT, MR = get_testdata_file('CT_small.dcm'), get_testdata_file('MR_small.dcm')

def test_no_fastai_import():
    code = "import fastdcm.pixels, sys; assert not any(m.startswith('fastai') for m in sys.modules)"
    subprocess.run([sys.executable, '-c', code], check=True)

@pytest.mark.parametrize('name', ['CT_small.dcm', 'MR_small.dcm', 'MR_small_implicit.dcm', 'rtdose.dcm',
                                  'rtdose_1frame.dcm', 'examples_overlay.dcm', 'image_dfl.dcm', 'examples_palette.dcm'])
@pytest.mark.parametrize('stage', ['stored', 'modality', 'display'])
def test_fast_path_agrees_with_pydicom_path(name, stage):
    f = get_testdata_file(name)
    ds = pydicom.dcmread(f)
    np.testing.assert_array_equal(dicom_pixels(f, stage), dicom_pixels(ds, stage))
    np.testing.assert_array_equal(dicom_pixels(f, stage), dicom_pixels(Path(f).read_bytes(), stage))

def test_frame_selection():
    f = get_testdata_file('rtdose.dcm')
    full = dicom_pixels(f)
    for i in (0, 7, 14): np.testing.assert_array_equal(dicom_pixels(f, frame=i), full[i])
    with pytest.raises(FrameIndexError, match='rtdose.dcm'): dicom_pixels(f, frame=15)
