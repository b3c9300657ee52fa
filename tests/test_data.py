"Property and fallback tests for fastdcm.data's patient splitters and leak check."
import warnings, copy
from pathlib import Path
import numpy as np, pandas as pd, pytest
import pydicom
from pydicom.data import get_testdata_file
from hypothesis import given, settings, strategies as st, HealthCheck
from fastdcm.data import PatientSplitter, PatientKFoldSplitter, patient_groups, check_leakage

@st.composite
def layouts(draw):
    "A DataFrame of images: random patients with random image counts, some IDs blank (study/folder fallback), shuffled rows."
    n_pat = draw(st.integers(1, 25))
    sizes = draw(st.lists(st.integers(1, 8), min_size=n_pat, max_size=n_pat))
    blank = draw(st.lists(st.sampled_from(['id', 'study', 'folder']), min_size=n_pat, max_size=n_pat))
    rows = []
    for p,(n,b) in enumerate(zip(sizes, blank)):
        for i in range(n):
            # study-fallback patients have one folder per image (as PACS exports do), so only the study UID groups them
            fname = f'scan{p}_{i}/img.dcm' if b=='study' else f'pat{p}/img{i}.dcm'
            rows.append({'fname': fname, 'truth': p,
                         'PatientID': f'P{p}' if b=='id' else draw(st.sampled_from(['', None, '  '])),
                         'StudyInstanceUID': f'1.2.{p}' if b in ('id','study') else None})
    order = draw(st.permutations(range(len(rows))))
    return pd.DataFrame([rows[i] for i in order]).reset_index(drop=True)

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(), st.floats(0.05, 0.95), st.integers(0, 10_000))
def test_patient_splitter_properties(df, valid_pct, seed):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        trn, val = PatientSplitter(valid_pct, seed=seed)(df)
    trn, val = list(trn), list(val)
    assert sorted(trn+val) == list(range(len(df)))                       # a partition
    assert not set(df.truth[trn]) & set(df.truth[val])                    # no patient (true identity) on both sides
    biggest = df.truth.value_counts().max()
    assert abs(len(val) - valid_pct*len(df)) <= biggest                   # within one patient of valid_pct
    if df.truth.nunique()>1: assert trn and val                           # both sides non-empty when possible

@settings(max_examples=60, deadline=None)
@given(layouts(), st.integers(2, 5), st.integers(0, 1000), st.booleans())
def test_kfold_properties(df, n_splits, seed, strat):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        if df.truth.nunique() < n_splits:
            with pytest.raises(ValueError, match='cannot fill'): PatientKFoldSplitter(n_splits, 0, seed)(df)
            return
        df['label'] = df.truth % 2
        folds = [PatientKFoldSplitter(n_splits, f, seed, stratify='label' if strat else None)(df) for f in range(n_splits)]
    for t,v in folds:
        assert not set(df.truth[list(t)]) & set(df.truth[list(v)])
        assert sorted(list(t)+list(v)) == list(range(len(df)))
    assert sorted(i for _,v in folds for i in v) == list(range(len(df)))   # each item validated once

def test_fallback_warns_and_counts():
    df = pd.DataFrame({'fname': ['a/1.dcm','a/2.dcm','b/3.dcm','c/4.dcm'], 'PatientID': ['P1', '', None, np.nan],
                       'StudyInstanceUID': ['1', '1.9', None, None]})
    with pytest.warns(UserWarning, match=r'3 of 4 items have no PatientID.*StudyInstanceUID \(1\).*folder \(2\)'):
        keys = patient_groups(df)
    assert list(keys) == ['P1', 'StudyInstanceUID:1.9', 'folder:b', 'folder:c']

def _write(ds, fn, **tags):
    ds = copy.deepcopy(ds)
    for k,v in tags.items():
        if v is None: delattr(ds, k)
        else: setattr(ds, k, v)
    fn.parent.mkdir(parents=True, exist_ok=True); ds.save_as(fn); return fn

def test_paths_read_header_and_fall_back(tmp_path):
    src = pydicom.dcmread(get_testdata_file('CT_small.dcm'))
    files = [_write(src, tmp_path/'p1'/'a.dcm', PatientID='X1'),
             _write(src, tmp_path/'p1'/'b.dcm', PatientID='X1'),
             _write(src, tmp_path/'s'/'c.dcm', PatientID='', StudyInstanceUID='1.2.3'),
             _write(src, tmp_path/'s'/'d.dcm', PatientID='', StudyInstanceUID='1.2.3'),
             _write(src, tmp_path/'f1'/'e.dcm', PatientID=None, StudyInstanceUID=None),
             _write(src, tmp_path/'f2'/'f.dcm', PatientID='', StudyInstanceUID=None)]
    with pytest.warns(UserWarning, match='4 of 6 items'):
        keys = patient_groups(files)
    assert list(keys[:4]) == ['X1', 'X1', 'StudyInstanceUID:1.2.3', 'StudyInstanceUID:1.2.3']
    assert keys[4] == f'folder:{tmp_path/"f1"}' and keys[5] == f'folder:{tmp_path/"f2"}'
    # a DataFrame without a patient column reads the headers of its files
    df = pd.DataFrame({'fname': [f.name for f in files], 'label': range(6)})
    df['fname'] = [str(f.relative_to(tmp_path)) for f in files]
    with pytest.warns(UserWarning):
        assert list(patient_groups(df, path=tmp_path)) == list(keys)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for seed in range(10):
            trn, val = PatientSplitter(0.3, seed=seed)(files)
            assert not set(keys[list(trn)]) & set(keys[list(val)])

def test_check_leakage_fastai_dls():
    from fastai.data.block import DataBlock, CategoryBlock, RegressionBlock
    from fastai.data.transforms import ColReader, RandomSplitter
    df = pd.DataFrame({'x': np.arange(40.), 'PatientID': [f'P{i//4}' for i in range(40)], 'y': [0,1]*20})
    mk = lambda spl: DataBlock(blocks=(RegressionBlock, CategoryBlock), get_x=ColReader('x'), get_y=ColReader('y'),
                               splitter=spl).dataloaders(df, bs=4)
    assert check_leakage(mk(PatientSplitter(0.25, seed=0))).empty
    with pytest.warns(UserWarning, match='also in the training set'):
        rep = check_leakage(mk(RandomSplitter(0.25, seed=0)))
    assert len(rep) > 0 and (rep.n_train>0).all() and (rep.n_valid>0).all()

def test_bad_arguments():
    with pytest.raises(ValueError): PatientSplitter(1.5)
    with pytest.raises(ValueError): PatientKFoldSplitter(1)
    with pytest.raises(TypeError): check_leakage([1, 2])
    with pytest.raises(TypeError, match="can't find the patient"): patient_groups([3.5])

def test_kfold_stratify_balances_labels():
    "4 positive patients of 20, 4 folds: stratified, each fold validates exactly one (unstratified misses often)."
    rows = [dict(fname=f'p{p}/{i}.dcm', PatientID=f'P{p}', label='pos' if p % 5 == 0 else 'neg')
            for p in range(20) for i in range(1 + p % 3)]
    df = pd.DataFrame(rows)
    for seed in range(5):
        for fold in range(4):
            trn, val = PatientKFoldSplitter(4, fold, seed, stratify='label')(df)
            assert df.iloc[list(val)].query("label == 'pos'").PatientID.nunique() == 1
            assert not set(df.PatientID.iloc[list(trn)]) & set(df.PatientID.iloc[list(val)])

# ---- issue 8 item 10, issue 14 item 4: one key function for both splitters, the leak check and the export ----
import unicodedata
from pydicom.dataset import Dataset

SPLITTERS = {'PatientSplitter': lambda seed: PatientSplitter(0.5, seed=seed),
             'PatientKFoldSplitter': lambda seed: PatientKFoldSplitter(2, 0, seed=seed)}

def _never_split(df, make, truth):
    "Over seeds, rows with the same `truth` never land on both sides."
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for seed in range(12):
            trn, val = make(seed)(df)
            assert not set(truth[list(trn)]) & set(truth[list(val)]), f'seed {seed}: a patient on both sides'

@pytest.mark.parametrize('name', SPLITTERS)
def test_unicode_and_float_ids_one_patient(name):
    "NFC/NFD spellings and float/str IDs of one patient are one group for both splitters."
    nfc, nfd = unicodedata.normalize('NFC', 'Müller'), unicodedata.normalize('NFD', 'Müller')
    assert nfc != nfd
    ids = [nfc, nfd, 4242.0, '4242', 17.0, '17'] + [f'Q{i}' for i in range(6)]
    truth = pd.Series(['M', 'M', 'A', 'A', 'B', 'B'] + [f'Q{i}' for i in range(6)])
    df = pd.DataFrame({'PatientID': pd.Series(ids, dtype=object), 'fname': [f'{i}.dcm' for i in range(12)]})
    _never_split(df, SPLITTERS[name], truth)

@pytest.mark.parametrize('name', SPLITTERS)
def test_placeholder_ids_are_missing(name):
    "ANONYMOUS/UNKNOWN/N/A/-/0 are no IDs: anonymised patients are told apart by name + birth date, else study, else folder."
    ph = ['ANONYMOUS', 'anonymous', 'UNKNOWN', 'None', 'N/A', '-', '0', 'n/a']
    df = pd.DataFrame({'PatientID': ph * 2, 'fname': [f'{p}/{i}.dcm' for i in range(2) for p in range(8)],
                       'PatientName': [f'Pat^{p}' for p in range(8)] * 2, 'PatientBirthDate': ['19700101'] * 16,
                       'StudyInstanceUID': [f'1.2.{i}.{p}' for i in range(2) for p in range(8)]})
    with pytest.warns(UserWarning, match=r'16 of 16 items.*PatientName\+PatientBirthDate \(16\), StudyInstanceUID \(0\)'):
        keys = patient_groups(df)
    assert len(set(keys)) == 8                                       # one group per (name, birth date), not one for all
    _never_split(df, SPLITTERS[name], pd.Series([p for _ in range(2) for p in range(8)]))

def test_issuer_is_part_of_the_key():
    df = pd.DataFrame({'PatientID': ['777', '777', '777'], 'IssuerOfPatientID': ['HOSP A', 'HOSP B', None], 'fname': ['a', 'b', 'c']})
    keys = patient_groups(df)
    assert len(set(keys)) == 3 and keys[2] == '777'
    ds = Dataset(); ds.PatientID, ds.IssuerOfPatientID = '777', 'HOSP A'
    assert patient_groups([ds])[0] == keys[0]

def test_name_birth_fallback_before_study():
    "Without an ID: (PatientName, PatientBirthDate) when both are real, then StudyInstanceUID; each counted in the warning."
    df = pd.DataFrame({'PatientID': ['', '', '', None], 'PatientName': ['Doe^Jane', 'DOE^JANE', 'Doe^Jane', 'Roe^R'],
                       'PatientBirthDate': ['19660712', '19660712', '', '00000000'],
                       'StudyInstanceUID': ['1.1', '1.2', '1.3', '1.4'], 'fname': ['a/1', 'b/2', 'c/3', 'd/4']})
    with pytest.warns(UserWarning, match=r'PatientName\+PatientBirthDate \(2\), StudyInstanceUID \(2\)'):
        keys = patient_groups(df)
    assert keys[0] == keys[1] and list(keys[2:]) == ['StudyInstanceUID:1.3', 'StudyInstanceUID:1.4']

def test_export_key_agrees_with_splitter_key():
    "The pseudonymous key of fastdcm.export groups exactly as patient_groups does."
    from fastdcm.export import patient_key
    salt = 'test-salt-0123456789'
    rows = [dict(PatientID=unicodedata.normalize('NFD', 'Müller')), dict(PatientID=unicodedata.normalize('NFC', 'Müller')),
            dict(PatientID='ANONYMOUS', PatientName='A^B', PatientBirthDate='19500101'),
            dict(PatientID='unknown', PatientName='C^D', PatientBirthDate='19600101'),
            dict(PatientID='777', IssuerOfPatientID='X'), dict(PatientID='777', IssuerOfPatientID='Y')]
    dss = []
    for r in rows:
        d = Dataset()
        for k, v in r.items(): setattr(d, k, v)
        dss.append(d)
    groups = patient_groups(dss, warn=False)
    exported = [patient_key(d, salt) for d in dss]
    same = lambda ks: [[a == b for b in ks] for a in ks]
    assert same(list(groups)) == same(exported)

def test_check_leakage_lists_probable_pairs():
    "IDs equal after case-folding, leading zeros or a trailing '.0' (a CSV round trip) are listed as probable leaks."
    train = pd.DataFrame({'PatientID': ['04242', 'ab12', 'P7', 'Z1'], 'fname': list('abcd')})
    valid = pd.DataFrame({'PatientID': ['4242.0', 'AB12', 'P8', 'Z1'], 'fname': list('efgh')})
    with pytest.warns(UserWarning, match='1 of 4 validation patients.*2 more pairs'):
        rep = check_leakage(train, valid)
    assert rep[['patient', 'valid_patient', 'match']].values.tolist() == [
        ['Z1', 'Z1', 'exact'], ['04242', '4242.0', 'probable'], ['ab12', 'AB12', 'probable']]
    assert check_leakage(train.iloc[2:3], valid.iloc[2:3], warn=False).empty
    # fallback keys (study, folder) are never 'probable' matches: '1.2.3.0' and '1.2.3' are two studies
    studies = lambda u: pd.DataFrame({'PatientID': [''], 'StudyInstanceUID': [u], 'fname': ['x']})
    assert check_leakage(studies('1.2.3.0'), studies('1.2.3'), warn=False).empty
