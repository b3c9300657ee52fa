"Bad input and discovery tests for fastdcm.core (the notebook shows the happy path)."
import os, shutil
from pathlib import Path
import pytest
import pandas as pd
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

# ---------------------------------------------------------------------------------------------------------------
# Issue 8 item 2: datasets without preamble or file meta are found and read; item 5: the header index keeps its shape
import re
import numpy as np, pydicom

def _meta_less(dst, implicit=True):
    ds = pydicom.dcmread(CT); del ds.file_meta; ds.preamble = None
    ds.save_as(dst, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    return dst

def test_get_dicom_files_finds_datasets_without_preamble(tmp_path):
    _meta_less(tmp_path/'IM0001'); _meta_less(tmp_path/'IM0002', implicit=False)
    big = Path(get_testdata_file('ExplVR_BigEndNoMeta.dcm')); (tmp_path/'IM0003').write_bytes(big.read_bytes())
    (tmp_path/'zeros').write_bytes(bytes(300)); (tmp_path/'text').write_text('0008 is not enough' * 10)
    (tmp_path/'group10').write_bytes(b'\x10\x00\x10\x00PN\x04\x00Doe^')          # explicit VR, but not group 0002/0008
    (tmp_path/'huge_len').write_bytes(b'\x08\x00\x05\x00\xff\xff\xff\x7f' + bytes(100))  # implicit VR, absurd length
    assert [f.name for f in get_dicom_files(tmp_path)] == ['IM0001', 'IM0002', 'IM0003']
    assert dcmread(tmp_path/'IM0001').file_meta.TransferSyntaxUID == '1.2.840.10008.1.2'
    assert dcmread(tmp_path/'IM0003').file_meta.TransferSyntaxUID == '1.2.840.10008.1.2.2'
    df = index_dicoms(tmp_path, progress=False)
    assert df.error.isna().all() and df.Modality.tolist() == ['CT', 'CT', 'RTPLAN']

def _implicit_copy(dst, **attrs):
    "CT_small in implicit VR little endian (4-byte lengths: room for absurd values), with `attrs` set."
    ds = pydicom.dcmread(CT); ds.file_meta.TransferSyntaxUID = '1.2.840.10008.1.2'
    for k, v in attrs.items(): setattr(ds, k, v)
    ds.save_as(dst, implicit_vr=True)
    return dst

def test_index_multi_values_stay_one_column(tmp_path):
    shutil.copy(CT, tmp_path/'ct.dcm'); shutil.copy(get_testdata_file('MR_small.dcm'), tmp_path/'mr.dcm')
    df = index_dicoms(tmp_path, progress=False)
    assert not [c for c in df.columns if re.fullmatch(r'(ImagePositionPatient|ImageType|PixelSpacing|WindowCenter)\d+', c)]
    ct = df.set_index(df.fname.map(lambda f: Path(f).name)).loc['ct.dcm']
    assert ct.ImageType == ('ORIGINAL', 'PRIMARY', 'AXIAL') and len(ct.ImagePositionPatient) == 3
    assert isinstance(ct.Rows, (int, np.integer)) and ct.Rows == 128

def test_one_corrupt_file_never_changes_the_index_shape(tmp_path):
    shutil.copy(CT, tmp_path/'a.dcm'); shutil.copy(get_testdata_file('MR_small.dcm'), tmp_path/'b.dcm')
    good = index_dicoms(tmp_path, progress=False)
    _implicit_copy(tmp_path/'c_values.dcm', ImageType=['X']*65535)                 # 65,535 values
    _implicit_copy(tmp_path/'d_text.dcm', StudyDescription='A' * 1_000_000)          # a 1 MB LO
    _implicit_copy(tmp_path/'e_vm.dcm')
    raw = bytearray((tmp_path/'e_vm.dcm').read_bytes())                             # Rows (US, VM 1) with two values
    el = pydicom.dcmread(tmp_path/'e_vm.dcm', stop_before_pixels=True).get_item(0x00280010)
    raw[el.value_tell-4:el.value_tell+2] = b'\x04\x00\x00\x00\x80\x00'; raw[el.value_tell+2:el.value_tell+2] = b'\x80\x00'
    (tmp_path/'e_vm.dcm').write_bytes(bytes(raw))
    (tmp_path/'f_junk.dcm').write_bytes(b'garbage' * 100)
    df = index_dicoms(tmp_path, progress=False)
    assert list(df.columns) == list(good.columns) and len(df) == 6
    rows = df.set_index(df.fname.map(lambda f: Path(f).name))
    assert rows.loc[['a.dcm', 'b.dcm'], 'error'].isna().all()
    assert len(rows.loc['c_values.dcm', 'ImageType']) == 1024 and 'ImageType has 65535 values' in rows.loc['c_values.dcm', 'error']
    assert len(rows.loc['d_text.dcm', 'StudyDescription']) == 10240 and '1000000 characters' in rows.loc['d_text.dcm', 'error']
    assert pd.isna(rows.loc['e_vm.dcm', 'Rows']) and 'Rows has 2 values' in rows.loc['e_vm.dcm', 'error']
    assert rows.loc['f_junk.dcm', 'error'].startswith('NotDicomError')
    assert rows.loc['c_values.dcm', 'PatientID'] == rows.loc['a.dcm', 'PatientID']    # the rest of a corrupt row is kept

def test_index_one_row_per_frame(tmp_path):
    from fastdcm.synth import synth_dicom
    from fastdcm.pixels import dicom_pixels
    cine = synth_dicom(tmp_path/'cine.dcm', modality='MR', frames=4, size=32, patient_id='P7')
    shutil.copy(CT, tmp_path/'ct.dcm')
    _implicit_copy(tmp_path/'liar.dcm', NumberOfFrames='99999999999')
    df = index_dicoms(tmp_path, progress=False, frames=True)
    assert list(df.columns[:2]) == ['fname', 'frame'] and df.frame.dtype.kind == 'i'
    by = {Path(f).name: g for f, g in df.groupby('fname')}
    assert by['cine.dcm'].frame.tolist() == [0, 1, 2, 3] and (by['cine.dcm'].PatientID == 'P7').all()
    assert by['ct.dcm'].frame.tolist() == [0] and by['ct.dcm'].error.isna().all()
    assert len(by['liar.dcm']) == 1 and 'Number of Frames 99999999999 cannot fit' in by['liar.dcm'].error.item()
    full = dicom_pixels(cine)
    for _, r in by['cine.dcm'].iterrows(): np.testing.assert_array_equal(dicom_pixels(r.fname, frame=r.frame), full[r.frame])
    assert 'frame' not in index_dicoms(tmp_path, progress=False).columns and len(index_dicoms(tmp_path, progress=False)) == 3

def test_text_where_a_number_belongs_is_left_out(tmp_path):
    "badVR.dcm's Number of Frames is '1A' (an IS): left out with a note, so the column stays numeric and the index writes to Parquet."
    bad = get_testdata_file('badVR.dcm')
    df = index_dicoms([CT, get_testdata_file('rtdose.dcm'), bad], progress=False)
    row = df.iloc[2]
    assert pd.isna(row.NumberOfFrames) and "NumberOfFrames '1A' is not a number (IS)" in row.error
    assert pd.api.types.is_numeric_dtype(df.NumberOfFrames.dropna().infer_objects())
    pytest.importorskip('pyarrow')
    df.to_parquet(tmp_path/'index.parquet', index=False)
    back = pd.read_parquet(tmp_path/'index.parquet')
    assert back.shape == df.shape and list(back.ImageType.iloc[0]) == list(df.ImageType.iloc[0])

def test_open_file_with_a_lying_length_allocates_nothing(tmp_path):
    "An open file is read through a memory map too: an element claiming 4 GB allocates nothing, and the file is left where pydicom leaves it."
    import struct, tracemalloc
    b = bytearray(Path(CT).read_bytes())
    pix = b.rfind(b'\xe0\x7f\x10\x00OW'); b[pix+8:pix+12] = struct.pack('<I', 0xFFFFFFF0)
    f = tmp_path/'lie.dcm'; f.write_bytes(bytes(b))
    with open(f, 'rb') as fp:
        tracemalloc.start()
        try:
            with pytest.raises(TruncatedDicomError, match='lie.dcm'): dcmread(fp)
            peak = tracemalloc.get_traced_memory()[1]
        finally: tracemalloc.stop()
    assert peak < 20 * len(b), peak
    with open(CT, 'rb') as a, open(CT, 'rb') as p:
        a.seek(0); ds = dcmread(a, stop_before_pixels=True); pydicom.dcmread(p, stop_before_pixels=True)
        assert a.tell() == p.tell() and ds.filename == CT and ds.Rows == 128
        np.testing.assert_array_equal(dcmread(open(CT, 'rb')).pixel_array, pydicom.dcmread(CT).pixel_array)

# ---------------------------------------------------------------------------------------------------------------
# header_dict converts raw elements with pydicom's own conversion, without the Dataset's bookkeeping: same index

from conftest import installed_test_files   # and the `no_downloads` fixture

def _charset_and_odd_files(d):
    "Headers whose conversion depends on the character set, ambiguous VRs, sequences, private and undecodable values."
    d.mkdir(parents=True, exist_ok=True)
    ct = pydicom.dcmread(get_testdata_file('CT_small.dcm'))
    out = []
    for i, (cs, name) in enumerate([('ISO_IR 100', 'Müller^Jürgen'), ('ISO_IR 192', 'Лиза^Ёж'), ('ISO 2022 IR 87', 'ﾔﾏﾀﾞ^ﾀﾛｳ'),
                                    ('ISO_IR 144', 'Иванов^Иван'), (None, 'Plain^Name')]):
        ds = ct.copy()
        if cs is None: del ds.SpecificCharacterSet
        else: ds.SpecificCharacterSet = cs
        ds.PatientName, ds.StudyDescription = name, f'{name} étude'
        ds.add_new(0x00091010, 'LO', 'private text')
        ds.ReferencedImageSequence = pydicom.Sequence([pydicom.Dataset()])
        ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = '1.2.3'
        f = d/f'cs{i}.dcm'
        try: ds.save_as(f)
        except Exception: continue   # a character set pydicom can't encode that name in
        out.append(f)
    ds = ct.copy()   # text where numbers belong (notes in `error`), written as raw bytes (pydicom refuses to encode them)
    from pydicom.dataelem import RawDataElement
    for tag, vr, v in ((0x00200013, 'IS', b'1A'), (0x00180050, 'DS', b'1,5 ')):
        ds[tag] = RawDataElement(pydicom.tag.Tag(tag), vr, len(v), v, 0, False, True)
    ds.save_as(d/'odd.dcm'); out.append(d/'odd.dcm')
    return out

def test_index_same_with_pydicoms_conversion_route(tmp_path, monkeypatch, no_downloads):
    "`index_dicoms` (rows per file and per frame, every column, errors included) is the same when each element goes through `Dataset.__getitem__` as before, on pydicom's test files, `fastdcm.synth`'s study set and bad files, and headers in several character sets."
    import fastdcm.core as core
    from fastdcm.synth import synth_study_set, synth_bad_files
    synth_study_set(tmp_path/'synth', n_patients=3, images_per_patient=2, size=32)
    files = (installed_test_files() + get_dicom_files(tmp_path/'synth') + list(synth_bad_files(tmp_path/'bad').values())
             + _charset_and_odd_files(tmp_path/'cs'))
    fast = index_dicoms(files, n_workers=0, progress=False)
    fast_frames = index_dicoms(files[:40], n_workers=0, progress=False, frames=True)
    monkeypatch.setattr(core, '_converted', lambda ds, tag, charset, settings=None: ds[tag])   # pydicom's Dataset route, as before
    ref = index_dicoms(files, n_workers=0, progress=False)
    pd.testing.assert_frame_equal(fast, ref)
    pd.testing.assert_frame_equal(fast_frames, index_dicoms(files[:40], n_workers=0, progress=False, frames=True))
    assert fast['error'].notna().sum() >= 5 and len(fast.columns) > 200   # errors and many columns were compared
    assert {'Müller^Jürgen', 'Лиза^Ёж'} <= set(fast['PatientName'].dropna())

# ---------------------------------------------------------------------------------------------------------------
# Dask index: tasks sized to the workers (issue 11 item 6)

class _InlineClient:
    "Stands in for a `dask.distributed.Client` with `n` workers: runs each task here, and records the tasks' sizes."
    def __init__(self, n): self.n, self.sizes = n, []
    def scheduler_info(self): return {'workers': {f'tcp://w{i}': {} for i in range(self.n)}}
    def map(self, fn, *its, pure=True):
        self.sizes += [len(o) for o in its[0] if isinstance(o, list)]   # the reading tasks (listing tasks get folders)
        return [fn(*a) for a in zip(*its)]
    def gather(self, futures): return futures

def test_partition_size_gives_every_worker_tasks():
    "About four tasks per worker, 50 to 1,000 files each: 2,000 files on 2 workers in 8 tasks (a fixed 1,000 made 2, one per worker, nothing to balance); 16 workers all busy on 10,000 files; small sets not cut into crumbs."
    from fastdcm.core import _partition_size
    assert _partition_size(2000, 2) == 250
    assert -(-10_000 // _partition_size(10_000, 16)) >= 4*16
    assert _partition_size(100, 8) == 50 and _partition_size(10**7, 2) == 1000 and _partition_size(0, 0) == 50

def test_dask_path_splits_by_workers_and_keeps_rows(tmp_path):
    "`index_dicoms(client=)` without a partition size reads in tasks sized to the client's workers; the frame equals the local one; an explicit `partition_size` still rules."
    src = pydicom.dcmread(CT)
    for i in range(120):
        d = tmp_path/f's{i % 3}'; d.mkdir(exist_ok=True)
        src.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(i)]); src.save_as(d/f'{i:03d}.dcm')
    local = index_dicoms(tmp_path, n_workers=0, progress=False)
    c = _InlineClient(2)
    pd.testing.assert_frame_equal(index_dicoms(tmp_path, client=c), local)
    assert c.sizes == [50, 50, 20]   # 120 files on 2 workers: 50 files per task at least
    c = _InlineClient(2)
    pd.testing.assert_frame_equal(index_dicoms(tmp_path, client=c, partition_size=7), local)
    assert c.sizes == [7]*17 + [1]

def test_reused_conversions_follow_pydicoms_settings(monkeypatch):
    "Conversions reused across files (`fastdcm.core._converted`) are keyed by pydicom's settings too: with dates converted to `datetime.date` (`config.datetime_conversion`) the index is again what the `Dataset.__getitem__` route gives, not the text cached before."
    import fastdcm.core as core
    files = [CT, get_testdata_file('MR_small.dcm')]
    before = index_dicoms(files, n_workers=0, progress=False)
    assert before['StudyDate'].notna().all()
    monkeypatch.setattr(pydicom.config, 'datetime_conversion', True)
    after = index_dicoms(files, n_workers=0, progress=False)
    assert after['StudyDate'].isna().all()   # a date object is not a plain value: left out, as header_dict does
    monkeypatch.setattr(core, '_converted', lambda ds, tag, charset, settings=None: ds[tag])
    pd.testing.assert_frame_equal(after, index_dicoms(files, n_workers=0, progress=False))
