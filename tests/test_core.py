"Bad input and discovery tests for fastdcm.core (the notebook shows the happy path)."
import os, shutil
from pathlib import Path
import pytest
from pydicom.data import get_testdata_file
from fastdcm.core import *

CT = get_testdata_file('CT_small.dcm')

def test_not_dicom_names_file(tmp_path):
    f = tmp_path/'notes.dcm'; f.write_text('not a dicom file at all')
    with pytest.raises(NotDicomError, match='notes.dcm'): dcmread(f)

def test_truncated_header(tmp_path):
    f = tmp_path/'cut.dcm'; f.write_bytes(Path(CT).read_bytes()[:1000])
    with pytest.raises(DicomError, match='cut.dcm'): dcmread(f)

def test_index_keeps_going(tmp_path):
    shutil.copy(CT, tmp_path/'good.dcm'); (tmp_path/'bad.dcm').write_bytes(b'garbage'*10)
    df = index_dicoms(tmp_path, progress=False)
    assert len(df) == 2
    bad = df.set_index(df.fname.map(lambda f: Path(f).name)).loc['bad.dcm']
    assert 'NotDicomError' in bad.error
    assert df.error.isna().sum() == 1
