"The `fastdcm` console script, run for real in subprocesses: help, index, info, show, convert (kill + resume), anonymize."
import os, re, sys, signal, subprocess, time, types
from pathlib import Path
import numpy as np, pandas as pd, pytest, PIL.Image
from pydicom.data import get_testdata_file
from fastdcm.export import read_converted
from fastdcm.pixels import dicom_pixels
from test_export import make_tree, phi_values, leaks, tree_hash, outputs, SALT

_script = Path(sys.executable).parent/'fastdcm'
FASTDCM = [str(_script)] if _script.exists() else [sys.executable, '-m', 'fastdcm.cli']
CT = get_testdata_file('CT_small.dcm')

def run(*args, check=True, **kw):
    env = {**os.environ, 'MPLBACKEND': 'Agg', 'PYTHONUNBUFFERED': '1'}
    r = subprocess.run(FASTDCM + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=300, **kw)
    if check and r.returncode != 0: raise AssertionError(f'exit {r.returncode}\n{r.stdout}\n{r.stderr}')
    return r

@pytest.fixture(autouse=True)
def _own_config(tmp_path, monkeypatch):
    "A default salt, when a test needs one, goes to a temporary config folder, not the user's ~/.config."
    monkeypatch.setenv('XDG_CONFIG_HOME', str(tmp_path/'config'))
    monkeypatch.delenv('FASTDCM_SALT', raising=False)

@pytest.mark.parametrize('cmd', ['index', 'info', 'show', 'convert', 'anonymize', 'demo'])
def test_help(cmd):
    r = run(cmd, '--help')
    assert r.stdout.startswith(f'usage: fastdcm {cmd}')

def test_no_command_is_usage_error():
    r = run(check=False)
    assert r.returncode == 2 and 'usage' in r.stderr

def test_index(tmp_path):
    tree = make_tree(tmp_path/'src'); (tree/'Doe_Jane'/'notes.dcm').write_bytes(b'not a DICOM file' * 20)
    before = tree_hash(tree)
    r = run('index', tree, '-o', tmp_path/'index.csv', '-q')
    df = pd.read_csv(tmp_path/'index.csv')
    assert len(df) == 7 and df.error.notna().sum() == 1 and df.Modality.eq('CT').sum() == 6
    assert '7 files indexed' in r.stdout and '1 unreadable' in r.stdout
    assert tree_hash(tree) == before
    r = run('index', tree, '-o', tmp_path/'index.txt', check=False)
    assert r.returncode != 0 and '.csv or .parquet' in r.stderr
    r = run('index', tmp_path/'typo', '-o', tmp_path/'typo.csv', check=False)
    assert r.returncode == 1 and 'typo: no such file or folder' in r.stderr and 'Traceback' not in r.stderr
    assert not (tmp_path/'typo.csv').exists()

def test_info(tmp_path):
    r = run('info', CT, get_testdata_file('JPEG2000.dcm'))
    assert 'modality: CT' in r.stdout and 'Explicit VR Little Endian' in r.stdout
    assert 'JPEG 2000' in r.stdout and 'decoder installed' in r.stdout
    assert 'patient ID: present (not shown)' in r.stdout and '1CT1' not in r.stdout
    from fastdcm.synth import synth_dicom
    f = synth_dicom(tmp_path/'w.dcm', modality='CT', size=32, windows=[(40, 400, 'SOFT'), (-600, 1500, 'LUNG')],
                    padding_value=-2000, intercept=-1024., patient_id='P-SECRET-77', bits_stored=12)
    out = run('info', f).stdout
    for want in ('rescale: value = 1 * stored - 1024 (HU)', 'window 0: center 40, width 400, LINEAR "SOFT"',
                 'window 1: center -600, width 1500, LINEAR "LUNG"', 'padding: stored value -2000',
                 'bits: allocated 16, stored 12, high bit 11, signed', 'frames: 1'):
        assert want in out, (want, out)
    assert 'P-SECRET-77' not in out
    r = run('info', get_testdata_file('README.txt'), check=False)
    assert r.returncode == 1 and 'README.txt' in r.stderr and 'Traceback' not in r.stderr

def test_show(tmp_path):
    for win in ['header', 'auto', '40,400', '-100,1500']:
        out = tmp_path/f'{win}.png'
        r = run('show', CT, '-o', out, f'--window={win}')   # '=' form: a negative centre isn't an option
        img = np.array(PIL.Image.open(out))
        assert img.dtype == np.uint8 and img.shape == (128, 128) and img.max() > img.min()
        want = np.round(np.clip(dicom_pixels(CT, stage='display', window=None if win in ('header', 'auto') else
                                             tuple(map(float, win.split(',')))), 0, 1) * 255)
        if win != 'auto': np.testing.assert_array_equal(img, want)
    a, b = (np.array(PIL.Image.open(tmp_path/f'{w}.png')) for w in ('40,400', '-100,1500'))
    assert not np.array_equal(a, b)
    mf = get_testdata_file('SC_rgb_rle_2frame.dcm')
    run('show', mf, '-o', tmp_path/'f1.png', '--frame', '1')
    assert np.array(PIL.Image.open(tmp_path/'f1.png')).shape == dicom_pixels(mf, frame=1).shape
    r = run('show', CT, '-o', tmp_path/'bad.png', '--window', '40,x', check=False)
    assert r.returncode == 1 and 'CENTER,WIDTH' in r.stderr and not (tmp_path/'bad.png').exists()
    for bad, says in [(['--frame', '2'], 'frame 2 out of range'), (['--window', 'NO_SUCH_WINDOW'], 'no window called')]:
        r = run('show', CT, '-o', tmp_path/'bad.png', *bad, check=False)
        assert r.returncode == 1 and 'CT_small.dcm' in r.stderr and says in r.stderr and 'Traceback' not in r.stderr
        assert not (tmp_path/'bad.png').exists()

def test_show_named_window(tmp_path):
    augment = pytest.importorskip('fastdcm.augment')
    name, (c, w) = next(iter(augment.dicom_windows.items()))
    run('show', CT, '-o', tmp_path/'named.png', '--window', name)
    want = np.round(np.clip(dicom_pixels(CT, stage='display', window=(c, w)), 0, 1) * 255)
    np.testing.assert_array_equal(np.array(PIL.Image.open(tmp_path/'named.png')), want)

def test_convert_round_trip_and_source_untouched(tmp_path):
    tree = make_tree(tmp_path/'src'); before = tree_hash(tree)
    for fmt in ['png16', 'tiff16', 'npy']:
        out = tmp_path/fmt
        r = run('convert', tree, out, '--format', fmt, '--salt', SALT, '--workers', '2')
        assert 'converted 6' in r.stdout
        meta = pd.read_csv(out/'metadata.csv')
        for _, row in meta.iterrows():
            x, want = read_converted(out/row.fname), dicom_pixels(tree/row.src)
            if np.array_equal(want, np.round(want)): np.testing.assert_array_equal(x, want)
            else: assert np.abs(x - want).max() <= 0.37/2 + 1e-3
        assert tree_hash(tree) == before
    r = run('convert', tree, tmp_path/'png16', '--salt', SALT)
    assert 'converted 0, skipped 6' in r.stdout

def test_convert_anonymize_and_anonymize_leave_no_phi(tmp_path):
    tree = make_tree(tmp_path/'src'); before, phi = tree_hash(tree), phi_values(tree)
    run('convert', tree, tmp_path/'png', '--anonymize', '--salt', SALT)
    run('anonymize', tree, tmp_path/'dcm', '--salt', SALT)
    assert tree_hash(tree) == before
    assert len(list((tmp_path/'png').glob('*.png'))) == 6 and len(list((tmp_path/'dcm').rglob('*.dcm'))) == 6
    assert leaks(tmp_path/'png', phi) == set()
    assert leaks(tmp_path/'dcm', phi) == set()

def test_salt_from_environment_not_in_output(tmp_path):
    tree = make_tree(tmp_path/'src')
    env = {**os.environ, 'FASTDCM_SALT': 'env-salt-123456'}
    subprocess.run(FASTDCM + ['convert', str(tree), str(tmp_path/'a'), '--anonymize'], check=True, env=env, capture_output=True)
    run('convert', tree, tmp_path/'b', '--anonymize', '--salt', 'env-salt-123456')
    assert outputs(tmp_path/'a') == outputs(tmp_path/'b')
    assert leaks(tmp_path/'a', {'env-salt-123456'}) == set()

def test_corrupt_file_reported(tmp_path):
    tree = make_tree(tmp_path/'src', corrupt=True); before = tree_hash(tree)
    r = run('convert', tree, tmp_path/'out', '--salt', SALT, check=False)
    assert r.returncode == 1
    assert 'converted 6' in r.stdout and 'failed 1' in r.stdout and 'FAILED Doe_Jane/broken.dcm' in r.stdout
    assert len(list((tmp_path/'out').rglob('*.png'))) == 6
    r = run('anonymize', tree, tmp_path/'anon', '--salt', SALT, check=False)
    assert r.returncode == 1 and 'anonymised 6' in r.stdout and 'failed 1' in r.stdout
    assert 'BURNED-IN' in r.stdout
    assert tree_hash(tree) == before

def test_refuses_destination_inside_source(tmp_path):
    tree = make_tree(tmp_path/'src'); before = tree_hash(tree)
    for cmd in ['convert', 'anonymize']:
        r = run(cmd, tree, tree/'out', check=False)
        assert r.returncode == 1 and 'inside the source' in r.stderr
    assert tree_hash(tree) == before

def _big_tree(root, copies=12):
    "make_tree's 6 files, copied into `copies` sub-folders: enough work to interrupt."
    base = make_tree(root/'base')
    src = root/'src'
    for i in range(copies):
        for f in base.rglob('*'):
            if f.is_file():
                d = src/f'batch{i:02d}'/f.relative_to(base); d.parent.mkdir(parents=True, exist_ok=True)
                d.write_bytes(f.read_bytes())
    return src

@pytest.mark.parametrize('anonymize', [False, True])
def test_interrupted_convert_resumes(tmp_path, anonymize):
    src = _big_tree(tmp_path); n = len([f for f in src.rglob('*') if f.is_file()])
    before = tree_hash(src)
    flags = ['--salt', SALT, '--workers', '1', '--format', 'tiff16'] + (['--anonymize'] if anonymize else [])
    run('convert', src, tmp_path/'full', *flags)
    part = tmp_path/'part'
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    p = subprocess.Popen(FASTDCM + ['convert', str(src), str(part)] + flags, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 120 and p.poll() is None and len(list(part.rglob('*.tiff'))) < 3: time.sleep(0.005)
    p.send_signal(signal.SIGKILL); p.wait()
    done = len(list(part.rglob('*.tiff')))
    assert 0 < done < n, f'{done} of {n} outputs when killed: could not interrupt mid-way'
    assert not (part/'metadata.csv').exists()
    r = run('convert', src, part, *flags)
    assert f'converted {n - done}, skipped {done}' in r.stdout
    assert outputs(part) == outputs(tmp_path/'full')            # same files, same bytes, no temporaries left
    assert tree_hash(src) == before

def test_demo_passes_arguments(tmp_path, monkeypatch, capsys):
    "`fastdcm demo` hands its options to fastdcm.learner.run_demo, which prints the metrics (in process, fake learner)."
    from fastdcm import cli
    calls = []
    fake = types.ModuleType('fastdcm.learner')
    fake.run_demo = lambda **kw: calls.append(kw) or {'accuracy': 0.9, 'valid_loss': 0.3}
    monkeypatch.setitem(sys.modules, 'fastdcm.learner', fake)
    assert cli.main(['demo', '--out', str(tmp_path/'d'), '--epochs', '2', '--seed', '7']) == 0
    assert calls == [{'out': str(tmp_path/'d'), 'epochs': 2, 'seed': 7, 'pretrained': False, 'verbose': True}]
    assert 'accuracy' not in capsys.readouterr().out     # run_demo says the metrics; the command doesn't repeat them
    cli.main(['demo', '--pretrained', '--n-patients', '8'])    # options left out keep run_demo's own defaults
    assert calls[-1] == {'n_patients': 8, 'pretrained': True, 'verbose': True}

def test_demo_3d_passes_arguments(tmp_path, monkeypatch):
    "`fastdcm demo --3d` hands its options to fastdcm.volume_learner.run_demo_3d, not to run_demo (in process, fakes)."
    from fastdcm import cli
    calls = {'2d': [], '3d': []}
    fake2, fake3 = types.ModuleType('fastdcm.learner'), types.ModuleType('fastdcm.volume_learner')
    fake2.run_demo = lambda **kw: calls['2d'].append(kw)
    fake3.run_demo_3d = lambda **kw: calls['3d'].append(kw) or {'dice': 0.9}
    fake3._monai_nets = lambda: None
    monkeypatch.setitem(sys.modules, 'fastdcm.learner', fake2); monkeypatch.setitem(sys.modules, 'fastdcm.volume_learner', fake3)
    assert cli.main(['demo', '--3d', '--out', str(tmp_path/'d3'), '--epochs', '3', '--n-patients', '6']) == 0
    assert cli.main(['demo', '--3d']) == 0
    assert calls == {'2d': [], '3d': [{'out': str(tmp_path/'d3'), 'epochs': 3, 'n_patients': 6, 'verbose': True}, {'verbose': True}]}
    with pytest.raises(SystemExit, match='--pretrained is for the 2-D demo'): cli.main(['demo', '--3d', '--pretrained'])
    assert len(calls['3d']) == 2

def test_demo_3d_without_monai_names_the_extra(tmp_path, monkeypatch):
    "Without MONAI (the 3d extra) `fastdcm demo --3d` stops with one message naming the extra, before writing anything."
    pytest.importorskip('fastdcm.volume_learner')
    from fastdcm import cli
    for k in ['monai'] + [k for k in sys.modules if k.startswith('monai.')]: monkeypatch.setitem(sys.modules, k, None)   # import -> ImportError
    with pytest.raises(SystemExit, match=re.escape('fastdcm[3d]')) as e: cli.main(['demo', '--3d', '--out', str(tmp_path/'d3')])
    assert str(e.value).startswith('fastdcm demo --3d: ')
    assert not (tmp_path/'d3').exists()
    from fastdcm.volume_learner import run_demo_3d
    with pytest.raises(ImportError, match=re.escape('fastdcm[3d]')): run_demo_3d(tmp_path/'d3b')
    assert not (tmp_path/'d3b').exists()

def test_demo_real(tmp_path):
    "The real `fastdcm demo`, as small as it goes (needs fastdcm.learner; no network: pretrained stays off)."
    pytest.importorskip('fastdcm.learner')
    r = run('demo', '--out', tmp_path/'demo', '--epochs', '1', '--n-patients', '8', '--seed', '1')
    assert r.stdout.count('Validation: ') == 1 and 'accuracy' in r.stdout.split('Validation: ')[1].splitlines()[0]
    assert 'patients in both sets: 0' in r.stdout
    assert not any(l.startswith(('accuracy:', 'valid_loss:')) for l in r.stdout.splitlines())   # metrics printed once
    assert (tmp_path/'demo'/'show_batch.png').exists()

def test_demo_3d_real(tmp_path):
    "The real `fastdcm demo --3d`, tiny (4 patients, 1 epoch): a finite whole-series Dice, a mask on the series grid, the files it names."
    pytest.importorskip('monai')
    r = run('demo', '--3d', '--out', tmp_path/'d3', '--epochs', '1', '--n-patients', '4', '--seed', '1')
    out = r.stdout
    assert '3 training / 1 validation patients; patients in both sets: 0' in out, out
    dice = re.findall(r'; Dice ([-+.\deinaINA]+) ', out)
    assert len(dice) == 1 and np.isfinite(float(dice[0])) and 0 <= float(dice[0]) <= 1, out
    grid = re.search(r'Predicted mask of (\S+): (\d+ x \d+ x \d+) voxels on the series grid of (\d+ x \d+ x \d+)', out)
    assert grid and grid[2] == grid[3] == '32 x 32 x 32', out
    assert Path(grid[1]).parent.parent == tmp_path/'d3'/'data' and len(list(Path(grid[1]).iterdir())) == 32
    series = pd.read_csv(tmp_path/'d3'/'series.csv')
    assert len(series) == 4 and series.split.value_counts().to_dict() == {'train': 3, 'valid': 1}
    assert all(Path(m).exists() for m in series['mask']) and str(tmp_path/'d3'/'data') in out
    assert (tmp_path/'d3'/'show_results.png').exists() and 'Traceback' not in r.stderr


# --- issue 10 item 6 / issue 8 item 6: the CLI speaks in its own terms and never shows a traceback ---------------

def test_info_on_folder_suggests_index(tmp_path):
    r = run('info', tmp_path, check=False)
    assert r.returncode == 1 and 'fastdcm index' in r.stderr and 'Traceback' not in r.stderr

@pytest.mark.parametrize('name,data', [('notes.txt', b'hello'), ('junk.dcm', b'\x01' * 300)])
def test_index_of_named_non_dicom_file(tmp_path, name, data):
    (tmp_path/name).write_bytes(data)
    r = run('index', tmp_path/name, '-o', tmp_path/'i.csv', '-q', check=False)
    assert r.returncode == 1 and f'{name}: not a DICOM file' in r.stderr, r.stderr
    assert not (tmp_path/'i.csv').exists() and 'force' not in r.stderr

def test_parquet_without_pyarrow_fails_before_scanning(tmp_path, monkeypatch):
    import fastdcm.core, fastdcm.cli
    monkeypatch.setitem(sys.modules, 'pyarrow', None)      # import pyarrow -> ImportError
    def no_scan(*a, **k): raise AssertionError('scanned before checking for pyarrow')
    monkeypatch.setattr(fastdcm.core, 'index_dicoms', no_scan)
    with pytest.raises(SystemExit, match='needs pyarrow'): fastdcm.cli.main(['index', str(tmp_path), '-o', str(tmp_path/'i.parquet')])

def test_force_advice_names_the_option_once(tmp_path):
    (tmp_path/'junk.dcm').write_bytes(b'\x01' * 300)
    for cmd in (['info', tmp_path/'junk.dcm'], ['show', tmp_path/'junk.dcm', '-o', tmp_path/'x.png']):
        r = run(*cmd, check=False)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert 'junk.dcm' in r.stderr and r.stderr.count('--force') == 1 and 'force=True' not in r.stderr, r.stderr
    assert run('info', '--force', CT).returncode == 0 and run('show', '--force', CT, '-o', tmp_path/'f.png').returncode == 0

def test_unknown_window_lists_valid_names(tmp_path):
    r = run('show', CT, '-o', tmp_path/'x.png', '--window', 'lung', check=False)
    assert r.returncode == 1 and 'lungs' in r.stderr and 'mediastinum' in r.stderr and 'Traceback' not in r.stderr

def test_show_writes_jpeg_or_refuses(tmp_path):
    run('show', CT, '-o', tmp_path/'x.jpg', '--window', 'brain')
    assert PIL.Image.open(tmp_path/'x.jpg').format == 'JPEG'
    r = run('show', CT, '-o', tmp_path/'x.gif', check=False)
    assert r.returncode == 1 and '.png, .jpg or .jpeg' in r.stderr and not (tmp_path/'x.gif').exists()

def test_named_window_imports_no_torch(tmp_path):
    code = (f"import sys; from fastdcm.cli import main; assert main(['show', {str(CT)!r}, '-o', {str(tmp_path/'x.png')!r},"
            " '--window', 'brain']) == 0; print(sorted(m for m in ('torch', 'fastai') if m in sys.modules))")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith('[]'), r.stdout + r.stderr

def test_demo_help_shows_defaults():
    "`demo --help` shows run_demo's defaults, and run_demo_3d's after 'with --3d:' where they differ."
    import inspect
    out = ' '.join(run('demo', '--help').stdout.split())
    pytest.importorskip('fastdcm.learner'); pytest.importorskip('fastdcm.volume_learner')
    from fastdcm.learner import run_demo
    from fastdcm.volume_learner import run_demo_3d
    sig2, sig3 = inspect.signature(run_demo).parameters, inspect.signature(run_demo_3d).parameters
    options = out.split('options:')[1]
    assert '--3d ' in options
    for opt, arg in [('out', 'out'), ('epochs', 'epochs'), ('n-patients', 'n_patients'), ('seed', 'seed')]:
        m = re.search(rf'--{opt} \S+ [^(]*\(default: ([^;)]+)(?:; with --3d: ([^)]+))?\)', options)
        assert m, (opt, options)
        want3 = 'a new temporary folder' if sig3[arg].default is None else str(sig3[arg].default)
        assert m[1] == str(sig2[arg].default) and (m[2] or m[1]) == want3, (opt, m[0], sig2[arg].default, want3)

def test_any_failure_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    "Whatever a file provokes inside pydicom/PIL (TypeError, NotImplementedError, ...): one line with the file, exit 1"
    import fastdcm.cli
    for exc in (TypeError('Cannot handle this data type'), NotImplementedError('unknown VR')):
        def boom(args, exc=exc): raise exc
        monkeypatch.setattr(fastdcm.cli, 'cmd_show', boom)
        assert fastdcm.cli.main(['show', str(tmp_path/'odd.dcm'), '-o', str(tmp_path/'x.png')]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and 'odd.dcm' in err and str(exc) in err and 'Traceback' not in err

def _frames_1a(path):
    "CT_small with Number of Frames (0028,0008) stored as IS '1A'"
    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag
    ds = pydicom.dcmread(CT)
    ds[0x00280008] = RawDataElement(Tag(0x00280008), 'IS', 2, b'1A', 0, False, True)
    ds.save_as(path)
    return path

def _rgb_columns_3(path):
    "SC_rgb.dcm whose Columns (0028,0011) says 3 instead of 100"
    b = Path(get_testdata_file('SC_rgb.dcm')).read_bytes()
    k = b.find(b'\x28\x00\x11\x00US\x02\x00')
    path.write_bytes(b[:k+8] + (3).to_bytes(2, 'little') + b[k+10:])
    return path

@pytest.mark.parametrize('make', [_frames_1a, _rgb_columns_3])
def test_lying_header_is_one_line_per_problem(tmp_path, make):
    "issue 8: `show` on IS '1A' printed 'invalid literal for int()' without the file; pydicom's warnings came with source lines"
    f = make(tmp_path/'liar.dcm')
    r = run('show', f, '-o', tmp_path/'x.png', check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and 'Traceback' not in r.stderr and 'invalid literal' not in r.stderr, r.stderr
    assert all(l.startswith('fastdcm show: ') and 'liar.dcm' in l for l in lines), r.stderr
    assert lines[-1].startswith('fastdcm show: error: ') and not (tmp_path/'x.png').exists()
    r = run('info', f, check=False)
    assert 'Traceback' not in r.stderr and all(l.startswith('fastdcm info: ') for l in r.stderr.strip().splitlines()), r.stderr

def test_unknown_vr_is_one_line(tmp_path):
    "issue 8: `info` on a file with an unknown VR let pydicom's NotImplementedError out as a traceback"
    b = Path(CT).read_bytes(); i = b.find(b'\x08\x00\x60\x00CS')          # Modality (0008,0060), explicit VR
    (tmp_path/'zz.dcm').write_bytes(b[:i+4] + b'ZZ' + b[i+6:])
    r = run('info', tmp_path/'zz.dcm', check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and 'zz.dcm' in lines[0] and "'ZZ'" in lines[0], r.stderr
    assert run('show', tmp_path/'zz.dcm', '-o', tmp_path/'x.png').returncode == 0    # the pixels don't need Modality

def test_salt_file_descriptors_and_burned_in_flags(tmp_path):
    "--salt-file gives the same outputs as the same --salt; --descriptors and --skip-burned-in reach the library."
    tree = make_tree(tmp_path/'src')
    sf = tmp_path/'salt.txt'; sf.write_text(SALT); sf.chmod(0o600)
    run('anonymize', tree, tmp_path/'a', '--salt', SALT, '--workers', '0')
    run('anonymize', tree, tmp_path/'b', '--salt-file', sf, '--workers', '0', '--descriptors', 'clean')
    names = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob('*.dcm'))
    assert names(tmp_path/'a') == names(tmp_path/'b') and names(tmp_path/'a')
    for n in names(tmp_path/'a'): assert (tmp_path/'a'/n).read_bytes() == (tmp_path/'b'/n).read_bytes()
    for cmd, extra in (('anonymize', ['--descriptors', 'retain']), ('convert', [])):
        r = run(cmd, tree, tmp_path/f'skip_{cmd}', '--salt-file', sf, '--workers', '0', '--skip-burned-in', *extra, check=False)
        assert 'Burned In Annotation (0028,0301) is YES: skipped' in r.stdout + r.stderr    # the tree's one such file
    r = run('anonymize', tree, tmp_path/'x', '--descriptors', 'keep-all', check=False)
    assert r.returncode != 0 and 'descriptors' in r.stderr
