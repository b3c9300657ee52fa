"""fastdcm.export: lossless round trips, no PHI in outputs, source untouched, resume, failures reported, PS3.15 anonymise.

`make_tree` (also used by test_cli.py) writes a tiny folder of 64 px DICOMs full of identifying data."""
import os, io, hashlib, shutil
from pathlib import Path
import numpy as np, pandas as pd, pytest, pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from fastdcm.core import dcmread, DicomError
from fastdcm.pixels import dicom_pixels
from fastdcm.export import *
from fastdcm.export import profile_tags

SALT = 'test-salt-0123456789'
PATIENTS = [('Smith^John', 'PID-884422', '19510203'), ('Doe^Jane', 'PID-991133', '19660712'), ('Roe^Rick', 'PID-335577', '19800101')]

def _ct(fn, name, pid, birth, study, seed, slope=1., intercept=-1024., burned=False, private=True):
    ds = pydicom.dcmread(get_testdata_file('CT_small.dcm'))
    rng = np.random.default_rng(seed)
    px = rng.integers(-1000, 2000, (64, 64)).astype(np.int16) if slope == 1 else rng.integers(0, 3000, (64, 64)).astype(np.int16)
    ds.Rows, ds.Columns, ds.PixelData = 64, 64, px.tobytes()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, pid, birth
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid(entropy_srcs=[study, 'series'])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[study, str(seed)])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstitutionName, ds.ReferringPhysicianName, ds.AccessionNumber = 'St Elsewhere Hospital', 'House^Gregory', 'ACC7766554'
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if burned: ds.BurnedInAnnotation = 'YES'
    if private: ds.add_new(0x00291010, 'LO', f'private note about {name}')
    fn.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(fn)
    return fn

def make_tree(root, corrupt=False):
    "3 patients x 2 CTs (one with a fractional slope, one burned-in) in folders named after them; optionally a corrupt file."
    root = Path(root); files = []
    for i, (name, pid, birth) in enumerate(PATIENTS):
        study = generate_uid(entropy_srcs=[pid])
        d = root/name.replace('^', '_')/'study1'
        files.append(_ct(d/'IM0001', name, pid, birth, study, 10*i))
        files.append(_ct(d/'IM0002.dcm', name, pid, birth, study, 10*i+1, slope=0.37 if i == 1 else 1.,
                         intercept=-10.5 if i == 1 else -1024., burned=i == 2))
    if corrupt: (root/'Doe_Jane'/'broken.dcm').write_bytes(Path(files[0]).read_bytes()[:200] + b'\x00' * 10)
    return root

def phi_values(root):
    "Every value (4+ characters) of a PS3.15 profile attribute in the source files, plus the folder names."
    tags = {(a << 16) | b for a, b, *r in profile_tags() if not r}
    vals = set()
    for f in root.rglob('*'):
        if f.is_dir(): vals.add(f.name); continue
        try: ds = pydicom.dcmread(f)
        except Exception: continue
        def grab(d, el):
            if el.tag in tags and el.VR not in ('SQ', 'OB', 'OW', 'UN', 'DS', 'IS', 'US', 'SS', 'UL', 'SL', 'FL', 'FD'):  # numbers identify no one
                for v in (el.value if isinstance(el.value, (list, pydicom.multival.MultiValue)) else [el.value]):
                    if len(str(v)) >= 4: vals.add(str(v))
        ds.walk(grab)
        for el in ds.file_meta: grab(ds.file_meta, el)
        vals |= {str(ds.PatientName), str(ds.PatientName).replace('^', '_'), ds.PatientID, ds.PatientBirthDate}
    return vals

def leaks(out, values):
    "Values found in the bytes or names of any file or folder under `out`."
    found = set()
    for p in out.rglob('*'):
        blob = p.name.encode() + (p.read_bytes() if p.is_file() else b'')
        found |= {v for v in values if v.encode() in blob or v.encode('utf-16-le') in blob}
    return found

def tree_hash(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob('*')):
        st = p.stat()
        h.update(str(p.relative_to(root)).encode() + str(st.st_mtime_ns).encode())
        if p.is_file(): h.update(p.read_bytes())
    return h.hexdigest()

def outputs(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob('*')) if p.is_file()}

@pytest.fixture(autouse=True)
def _own_config(tmp_path, monkeypatch):
    "A default salt, when a test needs one, goes to a temporary config folder, not the user's ~/.config."
    monkeypatch.setenv('XDG_CONFIG_HOME', str(tmp_path/'config'))
    monkeypatch.delenv('FASTDCM_SALT', raising=False)

@pytest.fixture
def tree(tmp_path): return make_tree(tmp_path/'src')

@pytest.mark.parametrize('fmt', ['png16', 'tiff16', 'npy'])
def test_round_trip(tree, tmp_path, fmt):
    before = tree_hash(tree)
    res = convert(tree, tmp_path/'out', fmt, salt=SALT, progress=False)
    assert (res['done'], res['skipped'], res['failed']) == (6, 0, [])
    assert tree_hash(tree) == before
    meta = pd.read_csv(tmp_path/'out'/'metadata.csv')
    assert len(meta) == 6 and meta.patient_key.nunique() == 3
    kinds = []
    for _, r in meta.iterrows():
        x, want = read_converted(tmp_path/'out'/r.fname), dicom_pixels(tree/r.src)
        assert output_names(tree/r.src, tree, fmt) == [r.fname]
        assert x.dtype == np.float32 and x.shape == want.shape
        kinds.append(np.array_equal(want, np.round(want)))
        if kinds[-1]: np.testing.assert_array_equal(x, want)     # integer HU: exact
        else:
            step = 0.37 if fmt != 'npy' else 0
            assert np.abs(x - want).max() <= step / 2 + 1e-4 * np.abs(want).max()
    assert sorted(kinds) == [False] + [True]*5                    # both branches were exercised

def test_display_stage_and_multiframe(tmp_path):
    src = tmp_path/'src'; src.mkdir()
    shutil.copy(get_testdata_file('SC_rgb_rle_2frame.dcm'), src/'rgb.dcm')
    shutil.copy(get_testdata_file('CT_small.dcm'), src/'ct.dcm')
    res = convert(src, tmp_path/'png', 'png16', progress=False)
    assert res['done'] == 2 and not res['failed']
    np.testing.assert_array_equal(read_converted(tmp_path/'png'/'rgb_f0001.png'), dicom_pixels(src/'rgb.dcm', frame=1))
    convert(src, tmp_path/'tif', 'tiff16', progress=False)
    np.testing.assert_array_equal(read_converted(tmp_path/'tif'/'rgb.tiff'), dicom_pixels(src/'rgb.dcm'))
    res = convert(src, tmp_path/'disp', 'png16', stage='display', progress=False)
    assert res['done'] == 2 and not res['failed']
    np.testing.assert_allclose(read_converted(tmp_path/'disp'/'rgb_f0000.png'), dicom_pixels(src/'rgb.dcm', stage='display', frame=0), atol=1e-6)
    d = dicom_pixels(src/'ct.dcm', stage='display')
    assert np.abs(read_converted(tmp_path/'disp'/'ct.png') - d).max() <= 0.5 / 65535 + 1e-7

def test_convert_anonymized_has_no_phi(tree, tmp_path):
    before, phi = tree_hash(tree), phi_values(tree)
    assert {'Smith^John', 'PID-884422', '19510203', 'Smith_John', 'St Elsewhere Hospital'} <= phi
    res = convert(tree, tmp_path/'out', 'png16', anonymize=True, salt=SALT, progress=False)
    assert res['done'] == 6
    assert tree_hash(tree) == before
    assert leaks(tmp_path/'out', phi) == set()
    meta = pd.read_csv(tmp_path/'out'/'metadata.csv')
    assert 'src' not in meta and meta.patient_key.nunique() == 3
    assert all(Path(f).name.startswith(k) for f, k in zip(meta.fname, meta.patient_key))
    named = {n for f in tree.rglob('IM*') for n in output_names(f, tree, 'png16', anonymize=True, salt=SALT)}
    assert named == set(meta.fname)
    # same salt -> same names and keys in another run; another salt -> different ones
    convert(tree, tmp_path/'again', 'png16', anonymize=True, salt=SALT, progress=False)
    assert outputs(tmp_path/'again') == outputs(tmp_path/'out')
    convert(tree, tmp_path/'other', 'png16', anonymize=True, salt='another salt', progress=False)
    assert set(pd.read_csv(tmp_path/'other'/'metadata.csv').patient_key).isdisjoint(meta.patient_key)

def test_anonymize_dicom_has_no_phi(tree, tmp_path):
    before, phi = tree_hash(tree), phi_values(tree)
    # what make_tree put in, independent of the profile table phi_values reads: all of it must be looked for
    assert {'Smith^John', 'PID-884422', '19510203', 'St Elsewhere Hospital', 'House^Gregory', 'ACC7766554'} <= phi
    assert {str(dcmread(f).StudyInstanceUID) for f in tree.rglob('IM*')} <= phi
    res = anonymize(tree, tmp_path/'anon', salt=SALT, progress=False)
    assert res['done'] == 6 and not res['failed'] and len(res['burned_in']) == 1
    assert tree_hash(tree) == before
    assert leaks(tmp_path/'anon', phi) == set()
    outs = sorted((tmp_path/'anon').rglob('*.dcm'))
    assert len(outs) == 6 and len({p.parent for p in outs}) == 3
    dss = [dcmread(p) for p in outs]
    for ds in dss:
        assert ds.PatientIdentityRemoved == 'YES' and not any(el.tag.is_private for el in ds)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == '1.2.840.10008.5.1.4.1.1.2'
    by_patient = {}
    for ds in dss: by_patient.setdefault(ds.PatientID, set()).add(ds.StudyInstanceUID)
    assert all(len(s) == 1 for s in by_patient.values())       # UIDs remapped consistently within a study
    src_px = sorted(dcmread(f).pixel_array.tobytes() for f in tree.rglob('IM*'))
    assert sorted(ds.pixel_array.tobytes() for ds in dss) == src_px
    res2 = anonymize(tree, tmp_path/'anon2', salt=SALT, progress=False, skip_burned_in=True)
    assert res2['done'] == 5 and len(res2['failed']) == 1 and 'Burned In Annotation' in res2['failed'][0][1]
    # same salt: same UIDs across runs
    assert {p.relative_to(tmp_path/'anon2') for p in (tmp_path/'anon2').rglob('*.dcm')} < {p.relative_to(tmp_path/'anon') for p in outs}

def test_corrupt_file_reported_rest_done(tmp_path):
    tree = make_tree(tmp_path/'src', corrupt=True)
    before = tree_hash(tree)
    res = convert(tree, tmp_path/'out', 'png16', salt=SALT, progress=False)
    assert res['done'] == 6 and len(res['failed']) == 1
    src, why = res['failed'][0]
    assert src == 'Doe_Jane/broken.dcm' and 'Error' in why
    assert pd.read_csv(tmp_path/'out'/'failures.csv').src.tolist() == ['Doe_Jane/broken.dcm']
    res = anonymize(tree, tmp_path/'anon', salt=SALT, progress=False)
    assert res['done'] == 6 and len(res['failed']) == 1 and 'Doe_Jane' not in res['failed'][0][0]
    assert tree_hash(tree) == before

def test_resume_gives_same_outputs(tree, tmp_path):
    full = tmp_path/'full'; part = tmp_path/'part'
    convert(tree, full, 'png16', anonymize=True, salt=SALT, progress=False)
    convert(tree, part, 'png16', anonymize=True, salt=SALT, progress=False)
    pngs = sorted(part.glob('*.png'))
    for p in pngs[:3]: p.unlink()                               # as if killed before these were written
    (part/'metadata.csv').unlink()
    (part/f'.{pngs[0].name}.123.fastdcm-tmp').write_bytes(b'half a png')   # a killed write leaves a temporary
    res = convert(tree, part, 'png16', anonymize=True, salt=SALT, progress=False)
    assert (res['done'], res['skipped']) == (3, 3)
    assert outputs(part) == outputs(full)

def test_never_writes_inside_source(tree, tmp_path):
    before = tree_hash(tree)
    for dst in [tree, tree/'out', tree/'Doe_Jane'/'x']:
        with pytest.raises(ValueError, match='inside the source'): convert(tree, dst, progress=False)
        with pytest.raises(ValueError, match='inside the source'): anonymize(tree, dst, progress=False)
    assert tree_hash(tree) == before

def test_refuses_to_mix_settings(tree, tmp_path):
    convert(tree, tmp_path/'out', 'png16', anonymize=True, salt=SALT, progress=False)
    for kw in [dict(format='tiff16'), dict(stage='display'), dict(anonymize=False), dict(salt='other-salt-0123')]:
        args = dict(format='png16', anonymize=True, salt=SALT) | kw
        with pytest.raises(ValueError, match='other settings|another salt'): convert(tree, tmp_path/'out', progress=False, **args)
    anonymize(tree, tmp_path/'anon', salt=SALT, progress=False)
    with pytest.raises(ValueError, match='another salt'): anonymize(tree, tmp_path/'anon', salt='other-salt-0123', progress=False)
    assert convert(tree, tmp_path/'out', 'png16', anonymize=True, salt=SALT, progress=False)['skipped'] == 6

def test_single_file(tree, tmp_path):
    f = tree/'Doe_Jane'/'study1'/'IM0001'; before = tree_hash(tree)
    res = convert(f, tree.parent/'one', 'npy', progress=False)      # a sibling of the file's folder is fine
    assert res['done'] == 1 and (tree.parent/'one'/'IM0001.npy').exists()
    np.testing.assert_array_equal(read_converted(tree.parent/'one'/'IM0001.npy'), dicom_pixels(f))
    with pytest.raises(ValueError, match='inside the source'): convert(tree/'Doe_Jane', tree/'Doe_Jane'/'study1'/'x', progress=False)
    for dst in (f.parent, f.parent/'png', f.parent/'a'/'b'):                   # the file's own folder is its source tree
        with pytest.raises(ValueError, match='inside the source folder'): convert(f, dst, progress=False)
        with pytest.raises(ValueError, match='inside the source folder'): anonymize(f, dst, progress=False)
    assert tree_hash(tree) == before

def test_leftover_cleaning_never_touches_the_source(tree, tmp_path):
    "A destination above the source: temporary-looking files inside the source are the user's, and stay."
    import shutil
    src = tmp_path/'data'/'scans'; shutil.copytree(tree, src)
    user_file = src/'Doe_Jane'/'.notes.fastdcm-tmp'; user_file.write_text('mine')
    stale = tmp_path/'data'/'x'/'.IM.png.123.fastdcm-tmp'; stale.parent.mkdir(parents=True); stale.write_text('stale')
    before = tree_hash(src)
    convert(src, tmp_path/'data', 'npy', progress=False)
    assert user_file.read_text() == 'mine' and tree_hash(src) == before
    assert not stale.exists()                                                 # our own leftovers outside it: removed

def test_salt_from_environment(tree, tmp_path, monkeypatch):
    monkeypatch.setenv('FASTDCM_SALT', SALT)
    convert(tree, tmp_path/'a', 'npy', anonymize=True, progress=False)
    convert(tree, tmp_path/'b', 'npy', anonymize=True, salt=SALT, progress=False)
    assert outputs(tmp_path/'a') == outputs(tmp_path/'b')
    monkeypatch.delenv('FASTDCM_SALT'); monkeypatch.setenv('XDG_CONFIG_HOME', str(tmp_path/'cfg'))
    s1 = resolve_salt(); assert resolve_salt() == s1 and len(s1) == 64
    assert (tmp_path/'cfg'/'fastdcm'/'salt').stat().st_mode & 0o077 == 0
    assert not list(tmp_path.glob('[ab]/**/salt'))

def test_quantize_general_within_half_step():
    rng = np.random.default_rng(3)
    for x in [rng.normal(size=(32, 32)) * 1e5, rng.uniform(0, 1, (16, 16)), np.full((4, 4), 7.25)]:
        q, m = quantize16(x.astype(np.float32))
        err = np.abs(dequantize16(q, **m) - x.astype(np.float32)).max()
        assert err <= m['scale'] / 2 + 1e-6 * max(1, np.abs(x).max())

def test_atomic_write_leaves_nothing_half_written(tmp_path):
    target = tmp_path/'o'/'x.png'
    def half(p): Path(p).write_bytes(b'half a png'); raise OSError('disk full')
    with pytest.raises(OSError, match='disk full'): atomic_write(target, half)
    assert not target.exists() and list(target.parent.iterdir()) == []
    target.write_bytes(b'old')                                   # an existing output is replaced whole or not at all
    with pytest.raises(OSError, match='disk full'): atomic_write(target, half)
    assert [p.name for p in target.parent.iterdir()] == ['x.png'] and target.read_bytes() == b'old'

def test_write_failing_mid_file_is_redone(tree, tmp_path, monkeypatch):
    "A writer dying half-way through one output leaves no file a later run would take as finished."
    import fastdcm.export as ex
    convert(tree, tmp_path/'full', 'png16', salt=SALT, progress=False)
    real, calls = ex._write_png, []
    def dies_on_third(fn, q, meta):
        calls.append(fn)
        if len(calls) == 3: Path(fn).write_bytes(b'\x89PNG half'); raise OSError('killed mid-write')
        real(fn, q, meta)
    monkeypatch.setattr(ex, '_write_png', dies_on_third)
    res = convert(tree, tmp_path/'part', 'png16', salt=SALT, progress=False, workers=0)
    assert res['done'] == 5 and len(res['failed']) == 1 and 'killed mid-write' in res['failed'][0][1]
    monkeypatch.setattr(ex, '_write_png', real)
    res = convert(tree, tmp_path/'part', 'png16', salt=SALT, progress=False, workers=0)
    assert (res['done'], res['skipped'], res['failed']) == (1, 5, [])
    assert outputs(tmp_path/'part') == outputs(tmp_path/'full')

def test_failures_report_leaks_no_phi(tmp_path, capsys):
    "With anonymisation on, a failing file is reported by pseudonym: failures.csv and the summary hold no PHI."
    tree = make_tree(tmp_path/'src'); phi = phi_values(tree)
    good = tree/'Smith_John'/'study1'/'IM0002.dcm'
    (tree/'Doe_Jane'/'broken.dcm').write_bytes(good.read_bytes()[:200] + bytes(10))      # not DICOM any more
    (tree/'Roe_Rick'/'cut_Smith_John.dcm').write_bytes(good.read_bytes()[:-3000])        # cut inside the pixel data
    res = convert(tree, tmp_path/'out', 'png16', anonymize=True, salt=SALT)
    res2 = anonymize(tree, tmp_path/'anon', salt=SALT)
    assert len(res['failed']) == 2 and len(res2['failed']) == 2
    assert any('Truncated' in why for _, why in res['failed'])
    assert (tmp_path/'out'/'failures.csv').exists() and (tmp_path/'anon'/'failures.csv').exists()
    assert leaks(tmp_path/'out', phi) == set() and leaks(tmp_path/'anon', phi) == set()
    shown = capsys.readouterr().out
    assert 'FAILED' in shown and {v for v in phi if v in shown} == set()

def test_profile_applies_inside_sequences(tmp_path):
    "PHI nested in sequence items (kept, removed, and referencing other instances) is gone; references stay consistent."
    src = tmp_path/'src'
    study = generate_uid(entropy_srcs=['nested'])
    a = _ct(src/'Smith_John'/'IM1.dcm', *PATIENTS[0], study, 1)
    b = _ct(src/'Smith_John'/'IM2.dcm', *PATIENTS[0], study, 2)
    ds = pydicom.dcmread(b)
    region = pydicom.Dataset()                       # a sequence the profile keeps, with PHI put inside its item
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = 'T-D3000', 'SRT', 'Chest'
    region.OperatorsName, region.PatientName = 'Ratched^Mildred', 'Smith^John'
    region.add_new(0x00291010, 'LO', 'private nested Smith^John')
    ds.AnatomicRegionSequence = [region]
    req = pydicom.Dataset(); req.RequestedProcedureID, req.ScheduledProcedureStepID = 'REQ-4477881', 'SPS-1122339'
    ds.RequestAttributesSequence = [req]             # a sequence the profile removes
    ref = pydicom.Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ds.SOPClassUID, pydicom.dcmread(a).SOPInstanceUID
    ds.ReferencedImageSequence = [ref]               # a reference to IM1
    ds.save_as(b)
    phi = phi_values(src)
    assert {'Ratched^Mildred', 'REQ-4477881', pydicom.dcmread(a).SOPInstanceUID} <= phi
    before = tree_hash(src)
    res = anonymize(src, tmp_path/'anon', salt=SALT, progress=False)
    assert res['done'] == 2 and not res['failed'] and tree_hash(src) == before
    assert leaks(tmp_path/'anon', phi) == set()
    outs = {dcmread(p).SOPInstanceUID: dcmread(p) for p in (tmp_path/'anon').rglob('*.dcm')}
    with_ref = [d for d in outs.values() if 'ReferencedImageSequence' in d]
    assert len(with_ref) == 1 and with_ref[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID in outs

# ---- issue 8 items 7-9, issue 14: deterministic profile, no silent loss, salts, burned-in text ----
import json, signal, subprocess, sys, textwrap, time, unicodedata
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
import fastdcm.export as ex

def _value(vr, n):
    "A value of VR `vr` that is easy to find again (`n` makes it unique)."
    vr = vr.split(' or ')[0]
    return {'DA': '20200102', 'TM': '101010', 'DT': '20200102101010', 'AS': '045Y', 'DS': '1.5', 'IS': '7',
            'UI': f'1.2.826.0.1.3680043.8.498.{n}', 'PN': f'Secret^Name{n}', 'UR': 'http://secret.example',
            'CS': 'SECRET', 'AE': 'SECRETAE', 'AT': 0x00100010,
            'SQ': Sequence([Dataset()]), 'OB': b'\x01\x02', 'OW': b'\x01\x02', 'UN': b'\x01\x02'}.get(
        vr, 7 if vr in ('US', 'SS', 'UL', 'SL', 'FL', 'FD') else f'secret {n}')

# combined actions: the IOD-conformant choice, documented in 08_export (X/Z -> Z, X/D, Z/D, X/Z/D -> D, X/Z/U* -> U*)
_CHOICE = {'Z/D': 'D', 'X/Z': 'Z', 'X/D': 'D', 'X/Z/D': 'D', 'X/Z/U*': 'U*'}

def _profile_dataset():
    "Every single-tag attribute of the profile table at the top level and again inside an item of a kept sequence."
    ds = Dataset(); inner = Dataset(); want = {}
    for n, ((g, e, *r), action) in enumerate(sorted(profile_tags().items())):
        if r or g in (0x0000, 0x0002): continue                  # repeating groups below; command/meta groups aren't data
        tag = (g << 16) | e
        if tag in (0x00100010, 0x00100020): continue              # Patient Name / ID become the pseudonymous key
        try: vr = dictionary_VR(tag).split(' or ')[0]
        except KeyError: vr = 'LO'                                 # newer than pydicom's dictionary: as an explicit-VR file holds it
        for d in (ds, inner):
            d.add_new(tag, vr, _value(vr, n))
            if vr == 'SQ': d[tag].value[0].add_new(0x00100010, 'PN', f'Nested^Secret{n}')
        want[tag] = (_CHOICE.get(action, action), vr, _value(vr, n))
    ds.add_new(0x60000010, 'US', 512); ds.add_new(0x60003000, 'OW', b'\x00' * 8); ds.add_new(0x60024000, 'LT', 'overlay note')
    ds.add_new(0x50000005, 'US', 2)                                # curve data (50xx,xxxx): X
    ds.add_new(0x00080000, 'UL', 1234)                             # a group length: stale once elements go
    ds.ReferencedSeriesSequence = Sequence([inner])                # not in the table: kept, its items protected
    return ds, want

def _check_action(d, tag, action, vr, orig, where):
    el = d.get(tag)
    if action == 'X': assert el is None, f'{where} {tag:08X} {keyword_for_tag(tag)}: X but kept'; return
    assert el is not None, f'{where} {tag:08X} {keyword_for_tag(tag)}: {action} but removed'
    if action == 'Z': assert el.VM == 0 or el.value in ('', None) or vr == 'SQ' and len(el.value) == 0, f'{where} {tag:08X}: Z but {el.value!r}'
    elif action == 'D':
        assert el.VM > 0 and el.value not in ('', None), f'{where} {tag:08X}: D but empty'
        if vr == 'UI': assert el.value == pseudo_uid(orig, SALT)
        elif vr == 'SQ': assert 'Secret' not in str(el.value[0].PatientName)
        elif vr not in ('US', 'SS', 'UL', 'SL', 'FL', 'FD', 'DS', 'IS'): assert el.value != orig, f'{where} {tag:08X}: D kept the value'
    elif action in ('U', 'U*'): assert vr != 'UI' or el.value == pseudo_uid(orig, SALT)
    else: raise AssertionError(f'unexpected action {action}')

def test_profile_actions_exactly_as_table(tmp_path):
    "A file holding every attribute of the Basic Profile table, top level and nested, through `anonymize`: X removed, Z emptied, D dummy, U remapped; overlays and curves whole."
    ds, want = _profile_dataset()
    assert len(want) > 600
    ds.SOPClassUID = '1.2.840.10008.5.1.4.1.1.7'                                 # Secondary Capture
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    (tmp_path/'src').mkdir(); ds.save_as(tmp_path/'src'/'all.dcm', enforce_file_format=True)
    res = anonymize(tmp_path/'src', tmp_path/'anon', salt=SALT, progress=False)
    assert res['done'] == 1, res
    out = pydicom.dcmread(next((tmp_path/'anon').rglob('*.dcm')))
    for tag, (action, vr, orig) in want.items():
        _check_action(out, tag, action, vr, orig, 'top')
        _check_action(out.ReferencedSeriesSequence[0], tag, action, vr, orig, 'nested')
    assert not [el.tag for el in out if 0x5000 <= el.tag.group <= 0x60FF]        # no Overlay / Curve element left
    assert 0x00080000 not in out
    assert out.LongitudinalTemporalInformationModified == 'REMOVED'
    removed = {keyword_for_tag(t) for t, (a, *_) in want.items() if a == 'X'}
    assert {'PerformedProcedureStepStartDate', 'DateOfLastCalibration'} <= removed
    assert 'Table E.1-1' in res['profile'] and '2026c' in res['profile']           # the report names the edition

def _with_references(fn, target_sop, study, n):
    "A CT whose sequences reference another instance: Referenced PPS (X/Z/D), SR-like Content Sequence (D), Source Image (X/Z/U*)."
    _ct(fn, *PATIENTS[0], study, n)
    ds = pydicom.dcmread(fn)
    pps = Dataset(); pps.ReferencedSOPClassUID, pps.ReferencedSOPInstanceUID = '1.2.840.10008.3.1.2.3.3', '1.2.826.0.1.3680043.8.498.77'
    ds.ReferencedPerformedProcedureStepSequence = Sequence([pps])
    ref = Dataset(); ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ds.SOPClassUID, target_sop
    item = Dataset(); item.RelationshipType, item.ValueType = 'CONTAINS', 'IMAGE'; item.ReferencedSOPSequence = Sequence([ref])
    ds.ContentSequence = Sequence([item])
    src = Dataset(); src.ReferencedSOPClassUID, src.ReferencedSOPInstanceUID = ds.SOPClassUID, target_sop
    ds.SourceImageSequence = Sequence([src])
    ds.save_as(fn)

def test_uids_deterministic_and_references_kept(tmp_path):
    "Two runs with one salt: byte-identical; every instance UID, in any sequence, through the one map; SOP classes kept."
    study = generate_uid(entropy_srcs=['refs'])
    a = _ct(tmp_path/'src'/'a.dcm', *PATIENTS[0], study, 1)
    target = pydicom.dcmread(a).SOPInstanceUID
    _with_references(tmp_path/'src'/'b.dcm', target, study, 2)
    anonymize(tmp_path/'src', tmp_path/'one', salt=SALT, progress=False)
    anonymize(tmp_path/'src', tmp_path/'two', salt=SALT, progress=False)
    assert outputs(tmp_path/'one') == outputs(tmp_path/'two')
    dss = [dcmread(p) for p in (tmp_path/'one').rglob('*.dcm')]
    b = next(d for d in dss if 'ContentSequence' in d)
    new_target = pseudo_uid(target, SALT)
    assert new_target in {d.SOPInstanceUID for d in dss}
    ref = b.ContentSequence[0].ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPInstanceUID, ref.ReferencedSOPClassUID) == (new_target, '1.2.840.10008.5.1.4.1.1.2')
    assert b.SourceImageSequence[0].ReferencedSOPInstanceUID == new_target
    pps = b.ReferencedPerformedProcedureStepSequence[0]
    assert pps.ReferencedSOPInstanceUID == pseudo_uid('1.2.826.0.1.3680043.8.498.77', SALT)
    assert pps.ReferencedSOPClassUID == '1.2.840.10008.3.1.2.3.3'               # well-known UID: kept

def test_descriptors_clean_and_retain(tmp_path):
    "Coded sequences repeating the study description: cleaned by default, kept verbatim with descriptors='retain'."
    ds = pydicom.dcmread(_ct(tmp_path/'x.dcm', *PATIENTS[0], '1.2.3.4', 1))
    ds.StudyDescription = ds.SeriesDescription = 'CT BRAIN WO IVCON'
    for kw in ('ProcedureCodeSequence', 'RequestedProcedureCodeSequence', 'PerformedProtocolCodeSequence'):
        c = Dataset(); c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = 'CTBRWO', '99LOCAL', 'CT BRAIN WO IVCON'
        setattr(ds, kw, Sequence([c]))
    buf = io.BytesIO(); deidentify(pydicom.dcmread(_save(ds, tmp_path/'y.dcm')), SALT).save_as(buf)
    clean = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    assert b'BRAIN' not in buf.getvalue()
    assert clean.ProcedureCodeSequence[0].CodeValue == 'CTBRWO' and clean.ProcedureCodeSequence[0].CodeMeaning
    assert 'descriptors clean' in clean.DeidentificationMethod
    kept = deidentify(pydicom.dcmread(tmp_path/'y.dcm'), SALT, descriptors='retain')
    assert kept.StudyDescription == 'CT BRAIN WO IVCON' and kept.PerformedProtocolCodeSequence[0].CodeMeaning == 'CT BRAIN WO IVCON'
    with pytest.raises(ValueError, match='descriptors'): deidentify(pydicom.dcmread(tmp_path/'y.dcm'), SALT, descriptors='keep')

def _save(ds, fn): ds.save_as(fn); return fn

def test_salt_sources_and_short_salts(tree, tmp_path, monkeypatch):
    "Salt from a file or $FASTDCM_SALT_FILE gives the same outputs as --salt; short salts are refused wherever they come from."
    f = tmp_path/'salt.txt'; f.write_text(SALT + '\n')
    convert(tree, tmp_path/'a', 'npy', anonymize=True, salt=SALT, progress=False)
    convert(tree, tmp_path/'b', 'npy', anonymize=True, salt_file=f, progress=False)
    monkeypatch.setenv('FASTDCM_SALT_FILE', str(f))
    convert(tree, tmp_path/'c', 'npy', anonymize=True, progress=False)
    assert outputs(tmp_path/'a') == outputs(tmp_path/'b') == outputs(tmp_path/'c')
    assert resolve_salt() == SALT.encode() == resolve_salt(salt_file=f)
    monkeypatch.setenv('FASTDCM_SALT', 'from-the-env-var')                          # the env var wins over the env file
    assert resolve_salt() == b'from-the-env-var'
    with pytest.raises(ValueError, match='not both'): resolve_salt(SALT, f)
    with pytest.raises(ValueError, match='at least'): resolve_salt('short')
    monkeypatch.setenv('FASTDCM_SALT', 'abc')
    with pytest.raises(ValueError, match=r'\$FASTDCM_SALT is 3 characters'): resolve_salt()
    f.write_text('tiny')
    with pytest.raises(ValueError, match='salt file'): resolve_salt(salt_file=f)
    with pytest.raises(ValueError, match='at least'): convert(tree, tmp_path/'d', progress=False, salt='abc')
    assert not (tmp_path/'d').exists()

def test_nothing_salt_derived_in_settings(tree, tmp_path):
    "The settings file is the same whatever the salt: it holds nothing to test a guessed salt against."
    for d, salt in (('a', SALT), ('b', 'a-different-salt-42')):
        convert(tree, tmp_path/d, 'npy', anonymize=True, salt=salt, progress=False)
        anonymize(tree, tmp_path/(d + 'dcm'), salt=salt, progress=False)
    assert (tmp_path/'a'/'.fastdcm.json').read_bytes() == (tmp_path/'b'/'.fastdcm.json').read_bytes()
    assert (tmp_path/'adcm'/'.fastdcm.json').read_bytes() == (tmp_path/'bdcm'/'.fastdcm.json').read_bytes()
    assert 'PS3.15' in json.loads((tmp_path/'adcm'/'.fastdcm.json').read_text())['profile']
    # another salt into the same folder is still refused, by comparing outputs, not by a stored check
    with pytest.raises(ValueError, match='another salt'): convert(tree, tmp_path/'a', 'npy', anonymize=True, salt='a-different-salt-42', progress=False)
    with pytest.raises(ValueError, match='another salt'): anonymize(tree, tmp_path/'adcm', salt='a-different-salt-42', progress=False)

def test_duplicate_sop_instance_uids_not_lost(tmp_path):
    "Two different images sharing a SOP Instance UID: one written, the other a failure naming both; identical copies: a duplicate."
    src = tmp_path/'src'
    a = _ct(src/'a'/'IM1.dcm', *PATIENTS[0], '1.2.3.4', 1)
    b = _ct(src/'b'/'IM1.dcm', *PATIENTS[0], '1.2.3.4', 1)
    ds = pydicom.dcmread(b); ds.PixelData = bytes(len(ds.PixelData)); ds.save_as(b)      # same UIDs, other pixels
    shutil.copy(a, src/'c.dcm')                                                     # an identical copy
    res = anonymize(src, tmp_path/'anon', salt=SALT, progress=False)
    assert res['done'] == 1 and len(res['failed']) == 1 and len(res['duplicates']) == 1
    assert 'same SOP Instance UID' in res['failed'][0][1] and 'identical copy' in res['duplicates'][0][1]
    assert len(list((tmp_path/'anon').rglob('*.dcm'))) == 1
    assert pd.read_csv(tmp_path/'anon'/'failures.csv').src.tolist() == [res['failed'][0][0]]
    # the first file in path order cannot be read: the next one with that UID is written instead
    (src/'a'/'IM1.dcm').write_bytes(Path(a).read_bytes()[:-3000])
    res = anonymize(src, tmp_path/'anon2', salt=SALT, progress=False)
    assert res['done'] == 1 and sorted(why.split()[0] for _, why in res['failed']) == ['TruncatedDicomError:', 'same']
    assert dcmread(next((tmp_path/'anon2').rglob('*.dcm'))).pixel_array.max() == 0      # b/IM1.dcm, the next in path order

def test_already_done_knows_the_source(tmp_path):
    "An output counts as done only if it was made from these bytes: another source with the same names is written again."
    s1, s2 = tmp_path/'s1', tmp_path/'s2'
    _ct(s1/'IM1.dcm', *PATIENTS[0], '1.2.3.4', 1); _ct(s2/'IM1.dcm', *PATIENTS[0], '1.2.3.4', 2)
    assert convert(s1, tmp_path/'out', 'npy', salt=SALT, progress=False)['done'] == 1
    res = convert(s2, tmp_path/'out', 'npy', salt=SALT, progress=False)
    assert (res['done'], res['skipped']) == (1, 0)
    np.testing.assert_array_equal(read_converted(tmp_path/'out'/'IM1.npy'), dicom_pixels(s2/'IM1.dcm'))
    assert convert(s2, tmp_path/'out', 'npy', salt=SALT, progress=False)['skipped'] == 1
    # anonymised outputs of another source tree: none of them is this run's, refused
    anonymize(s1, tmp_path/'anon', salt=SALT, progress=False)
    with pytest.raises(ValueError, match='another source'): anonymize(s2, tmp_path/'anon', salt=SALT, progress=False)

def test_second_run_into_a_busy_destination_refused(tree, tmp_path):
    "While a run holds the destination, another is refused at once with a clear message and touches nothing there."
    dst = tmp_path/'out'; dst.mkdir()
    tmp_of_first = dst/'.IM0001.png.999.fastdcm-tmp'; tmp_of_first.write_bytes(b'being written')
    fd = ex._lock(dst)                                          # as a running convert holds it
    try:
        for run in (lambda: convert(tree, dst, salt=SALT, progress=False), lambda: anonymize(tree, dst, salt=SALT, progress=False)):
            with pytest.raises(ex.DestinationInUseError, match='another fastdcm'): run()
        assert tmp_of_first.exists() and not (dst/'metadata.csv').exists()
    finally: ex._unlock(fd)
    assert convert(tree, dst, salt=SALT, progress=False)['done'] == 6 and not tmp_of_first.exists()

_KILL_SCRIPT = '''
import os, sys, time, multiprocessing, fastdcm.export as ex
multiprocessing.set_start_method('fork', force=True)   # so that the workers inherit the slow job below
def slow(*a, **k):                          # workers (forked) block inside a job, as on a slow disk; each says who it is
    open(os.path.join(sys.argv[3], str(os.getpid())), 'w').close(); time.sleep(60)
ex.dicom_pixels = slow
ex.convert(sys.argv[1], sys.argv[2], 'npy', salt='test-salt-0123456789', workers=2, progress=False)
'''

def _alive(pid):
    try: return Path(f'/proc/{pid}/stat').read_text().split(')')[-1].split()[0] != 'Z'
    except OSError: return False

@pytest.mark.skipif(not Path('/proc/self/task').exists() or sys.platform != 'linux', reason='reads /proc (Linux)')
def test_killed_run_leaves_no_workers(tree, tmp_path):
    "kill -9 of the main process: its worker processes exit too (bounded waits, everything cleaned up)."
    marks = tmp_path/'busy'; marks.mkdir()
    p = subprocess.Popen([sys.executable, '-c', _KILL_SCRIPT, str(tree), str(tmp_path/'out'), str(marks)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = set()
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60 and len(workers) < 2 and p.poll() is None:
            workers = {int(f.name) for f in marks.iterdir()}; time.sleep(0.05)
        assert len(workers) >= 2, 'the run never had two workers busy'
        p.send_signal(signal.SIGKILL); p.wait(10)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10 and any(_alive(w) for w in workers): time.sleep(0.05)
        assert not [w for w in workers if _alive(w)], 'worker processes outlived the killed run'
    finally:
        if p.poll() is None: p.kill(); p.wait(10)
        for w in workers:
            if _alive(w):
                try: os.kill(w, signal.SIGKILL)
                except ProcessLookupError: pass

def test_burned_in_text_flagged_and_skipped(tmp_path):
    "Burned In Annotation YES, and US/OT/SC/XC without the attribute, are flagged; skipped on request; an explicit NO is not."
    src = tmp_path/'src'
    for i, (mod, burned) in enumerate([('CT', None), ('CT', 'YES'), ('US', None), ('OT', None), ('US', 'NO')]):
        fn = _ct(src/f'f{i}.dcm', *PATIENTS[i % 3], f'1.2.3.{i}', i)
        ds = pydicom.dcmread(fn); ds.Modality = mod
        if burned: ds.BurnedInAnnotation = burned
        ds.save_as(fn)
    res = anonymize(src, tmp_path/'anon', salt=SALT, progress=False)
    assert res['done'] == 5 and len(res['burned_in']) == 3
    res = anonymize(src, tmp_path/'anon2', salt=SALT, progress=False, skip_burned_in=True)
    assert res['done'] == 2 and len(res['failed']) == 3 and all('skipped' in why for _, why in res['failed'])
    assert any('US image without Burned In Annotation' in why for _, why in res['failed'])
    res = convert(src, tmp_path/'png', salt=SALT, progress=False, anonymize=True, skip_burned_in=True)
    assert res['done'] == 2 and len(res['failed']) == 3

def test_bad_number_of_frames_is_a_typed_failure(tmp_path):
    "Number of Frames '1A': one line naming the file and the value, as a DicomError, not a bare int() message."
    fn = _ct(tmp_path/'src'/'bad.dcm', *PATIENTS[0], '1.2.3.4', 1)
    ds = pydicom.dcmread(fn)
    ds[0x00280008] = pydicom.dataelem.RawDataElement(pydicom.tag.Tag(0x00280008), 'IS', 2, b'1A', 0, False, True)
    ds.save_as(fn)
    with pytest.raises(DicomError, match=r"bad\.dcm: Number of Frames \(0028,0008\) is '1A'"):
        output_names(fn, tmp_path/'src')
    res = convert(tmp_path/'src', tmp_path/'out', salt=SALT, progress=False)
    assert len(res['failed']) == 1 and "DicomError: Number of Frames (0028,0008) is '1A'" in res['failed'][0][1]

def test_patient_key_normalised():
    "NFC/NFD, float IDs, placeholders and issuers: one patient one key, two patients two keys."
    def ds(**kw):
        d = Dataset()
        for k, v in kw.items(): setattr(d, k, v)
        return d
    nfc, nfd = unicodedata.normalize('NFC', 'Müller-77'), unicodedata.normalize('NFD', 'Müller-77')
    assert nfc != nfd and patient_key(ds(PatientID=nfc), SALT) == patient_key(ds(PatientID=nfd), SALT)
    anon = [patient_key(ds(PatientID=p, PatientName=n, PatientBirthDate=b), SALT)
            for p, n, b in [('ANONYMOUS', 'A^B', '19500101'), ('unknown', 'C^D', '19600101'), ('N/A', 'E^F', '19700101')]]
    assert len(set(anon)) == 3
    assert patient_key(ds(PatientID='777', IssuerOfPatientID='HOSP A'), SALT) != patient_key(ds(PatientID='777', IssuerOfPatientID='HOSP B'), SALT)
    from fastdcm.export import patient_identity
    assert patient_identity(4242.0) == patient_identity('4242') == ('4242', 'id')
    assert patient_identity('-', name='Smith^John', birth='19510203') == ('name:smith^john|19510203', 'name')
    assert patient_identity('0', name='Smith^John', birth='', study='1.2.3') == ('StudyInstanceUID:1.2.3', 'study')

def test_anonymized_files_are_part10(tmp_path):
    "Outputs are Part 10 files (zeroed preamble, DICM, file meta) even from a source without them, and re-read without force."
    src = tmp_path/'src'; src.mkdir()
    shutil.copy(get_testdata_file('OT-PAL-8-face.dcm'), src/'face.dcm')          # no preamble, no file meta
    shutil.copy(get_testdata_file('CT_small.dcm'), src/'ct.dcm')                  # a TIFF header in its preamble
    res = anonymize(src, tmp_path/'anon', salt=SALT, progress=False)
    assert res['done'] == 2 and not res['failed']
    for p in (tmp_path/'anon').rglob('*.dcm'):
        raw = p.read_bytes()
        assert raw[:128] == bytes(128) and raw[128:132] == b'DICM'
        ds = pydicom.dcmread(p)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID

def test_convert_two_sources_one_output_reported(tmp_path):
    "`a/IM1` and `a/IM1.dcm` both name `a/IM1.png`: one is written, the other reported, never a silent overwrite or skip."
    _ct(tmp_path/'src'/'a'/'IM1', *PATIENTS[0], '1.2.3.4', 1); _ct(tmp_path/'src'/'a'/'IM1.dcm', *PATIENTS[0], '1.2.3.4', 2)
    res = convert(tmp_path/'src', tmp_path/'out', salt=SALT, progress=False)
    assert res['done'] == 1 and len(res['failed']) == 1
    assert res['failed'][0][0] == 'a/IM1.dcm' and 'same output (a/IM1.png) as a/IM1' in res['failed'][0][1]
    np.testing.assert_array_equal(read_converted(tmp_path/'out'/'a'/'IM1.png'), dicom_pixels(tmp_path/'src'/'a'/'IM1'))
    assert len(pd.read_csv(tmp_path/'out'/'metadata.csv')) == 1

def test_short_salt_refused_everywhere(tmp_path):
    "A short salt is refused by every public entry point, as str or bytes."
    ds = pydicom.dcmread(get_testdata_file('CT_small.dcm'))
    for salt in ('abc', b'abc'):
        for call in (lambda: pseudonym('x', salt), lambda: pseudo_uid('1.2.3', salt), lambda: patient_key(ds, salt),
                     lambda: deidentify(pydicom.dcmread(get_testdata_file('CT_small.dcm')), salt)):
            with pytest.raises(ValueError, match='at least 12'): call()

def test_source_of_finds_a_failed_source(tmp_path):
    "An anonymising run reports a failure by pseudonym (no PHI in the output folder); the owner finds the file with source_of."
    from fastdcm.export import source_of
    tree = make_tree(tmp_path/'src')
    bad = next(tree.rglob('*.dcm')).parent/'broken.dcm'; bad.write_bytes(b'DICM' + bytes(200))
    res = anonymize(tree, tmp_path/'anon', salt=SALT, progress=False)
    (name, why), = [f for f in res['failed'] if 'broken' not in f[0]]
    assert source_of(name, tree, salt=SALT) == [bad]
    assert source_of(name, tree, salt=SALT + '-other') == []
