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

def test_cut_after_marker_or_file_meta(tmp_path):
    "pydicom returns an empty Dataset for a file that stops after the DICM marker or the file meta: a truncated file."
    from fastdcm.pixels import dicom_pixels
    b = Path(CT).read_bytes()
    meta_end = 144 + int.from_bytes(b[140:144], 'little')       # (0002,0000) File Meta Information Group Length
    for name, cut in (('marker.dcm', 132), ('meta.dcm', meta_end), ('meta_plus2.dcm', meta_end + 2)):
        f = tmp_path/name; f.write_bytes(b[:cut])
        with pytest.raises(TruncatedDicomError, match=name): dcmread(f)
        with pytest.raises(TruncatedDicomError, match=name): dcmread(f, stop_before_pixels=True)
        with pytest.raises(TruncatedDicomError, match=name): dicom_pixels(f)
    df = index_dicoms(tmp_path, progress=False)
    assert len(df) == 3 and df.error.str.startswith('TruncatedDicomError').all()

def test_get_dicom_files_skips_what_is_not_dicom(tmp_path):
    shutil.copy(CT, tmp_path/'UPPER.DCM'); shutil.copy(CT, tmp_path/'1.2.840.113619.2.55.3.7'); shutil.copy(CT, tmp_path/'noext')
    shutil.copy(CT, tmp_path/'DICOMDIR'); (tmp_path/'notes.txt').write_text('x' * 200); (tmp_path/'blob').write_bytes(bytes(300))
    (tmp_path/'.hidden').mkdir(); shutil.copy(CT, tmp_path/'.hidden'/'x.dcm')
    assert [f.name for f in get_dicom_files(tmp_path)] == ['1.2.840.113619.2.55.3.7', 'UPPER.DCM', 'noext']

def test_missing_path_is_an_error_not_an_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match='typo'): get_dicom_files(tmp_path/'typo')
    with pytest.raises(FileNotFoundError, match='typo'): index_dicoms(tmp_path/'typo', progress=False)
