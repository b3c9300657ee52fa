"""fastdcm.export: lossless round trips, no PHI in outputs, source untouched, resume, failures reported, PS3.15 anonymise.

`make_tree` (also used by test_cli.py) writes a tiny folder of 64 px DICOMs full of identifying data."""
import os, io, hashlib, shutil
from pathlib import Path
import numpy as np, pandas as pd, pytest, pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from fastdcm.core import dcmread
from fastdcm.pixels import dicom_pixels
from fastdcm.export import *
from fastdcm.export import profile_tags

SALT = 'test-salt'
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
    assert res2['done'] == 5 and len(res2['failed']) == 1 and 'BurnedInAnnotation' in res2['failed'][0][1]
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
    for kw in [dict(format='tiff16'), dict(stage='display'), dict(anonymize=False), dict(salt='other')]:
        args = dict(format='png16', anonymize=True, salt=SALT) | kw
        with pytest.raises(ValueError, match='other settings'): convert(tree, tmp_path/'out', progress=False, **args)
    anonymize(tree, tmp_path/'anon', salt=SALT, progress=False)
    with pytest.raises(ValueError, match='other settings'): anonymize(tree, tmp_path/'anon', salt='other', progress=False)
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
