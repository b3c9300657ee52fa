"Fuzz: mutated bytes of valid files either read fine or raise a DicomError subclass -- never anything else."
from pathlib import Path
import numpy as np, pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from pydicom.data import get_testdata_file
from fastdcm.core import *
from fastdcm.pixels import dicom_pixels, PixelDecodeError

SOURCES = {n: Path(get_testdata_file(n)).read_bytes() for n in ('CT_small.dcm', 'MR_small.dcm', 'MR_small_RLE.dcm')}
# where the Pixel Data element starts: most bytes are pixels, so half the flips are aimed at the header before it
HEADER_END = {n: b.rfind(b'\xe0\x7f\x10\x00') for n, b in SOURCES.items()}

def _decode(fn):
    "Everything a user does with a file: header, header table, pixels at every stage."
    ds = dcmread(fn)
    header_dict(ds)
    for stage in ('stored', 'modality', 'display'): dicom_pixels(fn, stage=stage)

def _mutant(tmp_path, name, edits, keep=None):
    b = bytearray(SOURCES[name])
    for pos, val in edits: b[pos] = val
    if keep is not None: b = b[:keep]
    fn = tmp_path/'mutant.dcm'; fn.write_bytes(bytes(b))
    return fn

mutation = st.tuples(st.sampled_from(sorted(SOURCES)),
                     st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255), st.booleans()), min_size=1, max_size=8),
                     st.one_of(st.none(), st.floats(0.05, 1)))

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=mutation)
def test_mutated_files_raise_only_dicom_errors(tmp_path, m):
    name, flips, keep = m
    n = len(SOURCES[name])
    edits = [(int(pos*(HEADER_END[name] if in_header else n)), val) for pos, val, in_header in flips]
    fn = _mutant(tmp_path, name, edits, None if keep is None else max(1, int(keep*n)))
    try: _decode(fn)
    except DicomError as e: assert 'mutant.dcm' in str(e)

# Mutants found by fuzzing, on which pydicom itself raises something other than InvalidDicomError (while reading,
# converting an element, or decoding pixels): each must come out as a typed error naming the file.
CORPUS = [('CT_small.dcm', [(955, 130), (404, 78)], NotDicomError),          # unknown VR 'NM' (NotImplementedError)
          ('CT_small.dcm', [(812, 20)], TruncatedDicomError),               # a length beyond the end of the file
          ('CT_small.dcm', [(473, 16), (274, 69)], UnsupportedTransferSyntaxError),   # a transfer syntax that doesn't exist
          ('CT_small.dcm', [(343, 129)], NotDicomError),                    # ValueError: embedded null character
          ('MR_small.dcm', [(1442, 210)], PixelDecodeError),     # Pixel Representation 210 (ValueError)
          ('MR_small.dcm', [(1484, 29), (137, 19)], NotDicomError),         # BytesLengthException while reading
          ('MR_small.dcm', [(251, 51), (1395, 95)], NotDicomError),         # unknown VR in the file meta
          # was 'RLE stream no plugin can decode': its Rows now promise more bytes than RLE can code in this Pixel Data
          ('MR_small_RLE.dcm', [(1387, 193), (733, 94)], PixelDataLengthError)]

@pytest.mark.parametrize('name,edits,cls', CORPUS, ids=lambda o: str(o)[:24])
def test_known_mutants_raise_typed_errors(tmp_path, name, edits, cls):
    fn = _mutant(tmp_path, name, edits)
    with pytest.raises(cls, match='mutant.dcm'): _decode(fn)
