"Fuzz: mutated bytes of valid files either read fine or raise a DicomError subclass -- never anything else."
from pathlib import Path
import numpy as np, pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from pydicom.data import get_testdata_file
from fastdcm.core import *
from fastdcm.pixels import dicom_pixels

SOURCES = {n: Path(get_testdata_file(n)).read_bytes() for n in ('CT_small.dcm', 'MR_small.dcm', 'MR_small_RLE.dcm')}

def _decode(fn):
    "Everything a user does with a file: header, header table, pixels at every stage."
    ds = dcmread(fn)
    header_dict(ds)
    for stage in ('stored', 'modality', 'display'): dicom_pixels(fn, stage=stage)

mutation = st.tuples(st.sampled_from(sorted(SOURCES)),
                     st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8),
                     st.one_of(st.none(), st.floats(0.05, 1)))

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=mutation)
def test_mutated_files_raise_only_dicom_errors(tmp_path, m):
    name, flips, keep = m
    b = bytearray(SOURCES[name])
    for pos, val in flips: b[int(pos*len(b))] = val
    if keep is not None: b = b[:max(1, int(keep*len(b)))]
    fn = tmp_path/'mutant.dcm'; fn.write_bytes(bytes(b))
    try: _decode(fn)
    except DicomError as e: assert 'mutant.dcm' in str(e)
