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

# ---------------------------------------------------------------------------------------------------------------
# Issue 8 item 4: headers that lie. Mutants whose geometry (Rows, Columns, Number of Frames, Bits Allocated, Samples
# per Pixel) or element lengths lie; besides raising only DicomErrors, nothing may allocate more than a small multiple
# of the file's size (a lie is refused by comparing with the bytes in the file before allocating).
import io, struct, tracemalloc
import pydicom

ALLOC_FACTOR, ALLOC_SLACK = 48, 2**20     # legitimate decodes of these files peak at ~12x their size (all stages)

def _decode_within_budget(fn):
    "`_decode(fn)` under tracemalloc: the peak allocation must stay within ALLOC_FACTOR x the file's size (+ slack)."
    size = fn.stat().st_size
    tracemalloc.start()
    try:
        try: _decode(fn)
        except DicomError as e: assert fn.name in str(e), e
        peak = tracemalloc.get_traced_memory()[1]
    finally: tracemalloc.stop()
    assert peak <= ALLOC_FACTOR*size + ALLOC_SLACK, f'{fn.name}: peak allocation {peak} bytes for a {size}-byte file'

_LONG = {'OB', 'OD', 'OF', 'OL', 'OV', 'OW', 'SQ', 'UC', 'UN', 'UR', 'UT'}

def _length_fields(name):
    "(offset, size in bytes) of every top-level element's length field in SOURCES[name], from pydicom's own `value_tell`."
    ds = pydicom.dcmread(io.BytesIO(SOURCES[name]))
    res = []
    for tag in ds.keys():
        raw = ds.get_item(tag, keep_deferred=True)
        if getattr(raw, 'value_tell', None) is None or raw.length == 0xFFFFFFFF: continue   # (converted while reading: skipped)
        n = 4 if raw.is_implicit_VR or raw.VR in _LONG else 2
        res.append((raw.value_tell - n, n))
    return res

LENGTH_FIELDS = {n: _length_fields(n) for n in SOURCES}

lying_length = st.tuples(st.sampled_from(sorted(SOURCES)), st.floats(0, 1, exclude_max=True),
                         st.sampled_from([0xFFFFFFF0, 0x7FFFFFFF, 0x10000000, 0xFFFF, 0xFFFE, 12345, 1, 0, 'double', 'file']))

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=lying_length)
def test_lying_element_lengths(tmp_path, m):
    name, where, new = m
    b = bytearray(SOURCES[name])
    pos, n = LENGTH_FIELDS[name][int(where*len(LENGTH_FIELDS[name]))]
    old = int.from_bytes(b[pos:pos+n], 'little')
    v = {'double': 2*old + 2, 'file': len(b)}.get(new, new)
    b[pos:pos+n] = (v % 2**(8*n)).to_bytes(n, 'little')
    fn = tmp_path/'mutant.dcm'; fn.write_bytes(bytes(b))
    _decode_within_budget(fn)

GEOMETRY = {'Rows': [0, 1, 3, 63, 64, 65, 127, 256, 4096, 65535], 'Columns': [0, 1, 3, 63, 64, 65, 127, 256, 4096, 65535],
            'NumberOfFrames': ['0', '-1', '2', '3', '1000', '99999999999'], 'BitsAllocated': [1, 8, 12, 16, 32, 64],
            'SamplesPerPixel': [0, 2, 3, 4], 'BitsStored': [0, 1, 8, 17, 64]}
geometry_lie = st.tuples(st.sampled_from(sorted(SOURCES)),
                         st.lists(st.sampled_from(sorted(GEOMETRY)).flatmap(lambda k: st.tuples(st.just(k), st.sampled_from(GEOMETRY[k]))),
                                  min_size=1, max_size=3))

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=geometry_lie)
def test_geometry_lies(tmp_path, m):
    name, edits = m
    ds = pydicom.dcmread(io.BytesIO(SOURCES[name]))
    for k, v in edits: setattr(ds, k, v)
    fn = tmp_path/'mutant.dcm'
    ds.save_as(fn)
    _decode_within_budget(fn)
    # a native file that decodes holds exactly the pixels its header describes (one pad byte at most)
    try: arr = dicom_pixels(fn, 'stored')
    except DicomError: return
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        assert len(ds.PixelData) - arr.size*int(ds.BitsAllocated)//8 in (0, 1), (edits, arr.shape, len(ds.PixelData))
