"""Scale-out (issue 11): `index_dicoms`, `convert` and `anonymize` as Dask tasks on a real two-process `LocalCluster`,
and DICOM from object storage through fsspec against a real S3 server (moto) on the loopback interface.

Everything here needs the `scale`/`cloud` extras (in `dev`); without them each test is skipped with the reason."""
import os, shutil, hashlib
from pathlib import Path
import numpy as np, pandas as pd, pytest, pydicom
from pydicom.data import get_testdata_file
from fastdcm.core import index_dicoms, get_dicom_files, dcmread
import fastdcm.core as core

def _need(mod, extra):
    return pytest.importorskip(mod, reason=f'needs the {extra} extra: pip install "fastdcm[{extra}]"')

@pytest.fixture(scope='module')
def client():
    "Two worker processes, one thread each, on the loopback interface only; closed when the module's tests are done."
    distributed = _need('distributed', 'scale'); _need('pyarrow', 'scale')
    with distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1, host='127.0.0.1',
                                  dashboard_address=None, worker_dashboard_address=None) as cluster, \
         distributed.Client(cluster, timeout='60s') as c:
        yield c

def _archive(root, n=45):
    "pydicom's own files (CT, MR, RT, SR, a truncated one...) in three site folders and the top level, plus a corrupt and an empty file."
    test_dir = Path(get_testdata_file('CT_small.dcm')).parent
    files = [p for p in sorted(test_dir.iterdir()) if p.is_file() and p.suffix.lower()=='.dcm'][:n]
    for i,f in enumerate(files):
        d = root if i%4==3 else root/f'site{i%4}'/'study'
        d.mkdir(parents=True, exist_ok=True); shutil.copy(f, d/f.name)
    (root/'site0'/'corrupt.dcm').write_bytes(b'DICM but not really' * 30)
    (root/'site1'/'empty.dcm').write_bytes(b'')
    return root

def test_dask_index_equals_local_row_for_row(tmp_path, client):
    arc = _archive(tmp_path/'arc')
    local = index_dicoms(arc, progress=False, n_workers=0)
    assert local.error.notna().sum() >= 2 and local.error.isna().sum() > 30      # errors are rows too
    dask = index_dicoms(arc, client=client, partition_size=7)
    pd.testing.assert_frame_equal(dask, local)
    framed = index_dicoms(arc, client=client, partition_size=7, frames=True)
    pd.testing.assert_frame_equal(framed, index_dicoms(arc, progress=False, n_workers=0, frames=True))
    files = get_dicom_files(arc)
    pd.testing.assert_frame_equal(index_dicoms(files, client=client, partition_size=5), index_dicoms(files, progress=False))

def _read_sorted(idx):
    return pd.read_parquet(idx).sort_values(['fname'], ignore_index=True)

def test_dask_parquet_index_and_incremental_reindex(tmp_path, client):
    arc = _archive(tmp_path/'arc')
    idx, idx_local = tmp_path/'index.parquet', tmp_path/'local.parquet'
    r = index_dicoms(arc, client=client, to=idx, partition_size=6)
    n = len(get_dicom_files(arc))
    assert (r['files'], r['read'], r['kept'], r['rows']) == (n, n, 0, n)
    assert len(list(idx.glob('part-*.parquet'))) == -(-n//6)            # one part per task: no process held all rows
    index_dicoms(arc, to=idx_local, partition_size=6)                    # the same without Dask
    back, local = _read_sorted(idx), index_dicoms(arc, progress=False).sort_values('fname', ignore_index=True)
    pd.testing.assert_frame_equal(back, _read_sorted(idx_local))
    assert back.fname.tolist() == local.fname.tolist() and back.error.notna().tolist() == local.error.notna().tolist()
    assert back.Modality.fillna('').tolist() == local.Modality.fillna('').tolist()
    assert {'file_size', 'file_mtime_ns'} <= set(back.columns)
    # change one file, remove one, add one; overwrite a fourth with zeros of the same size and time: read again it
    # would become an error row, so an unchanged row for it proves it was not read
    on_disk = [Path(f) for f in get_dicom_files(arc)]
    good = [f for f in on_disk if pd.isna(back.set_index('fname').loc[str(f), 'error'])]
    changed, gone, junk = good[1], good[4], good[9]
    changed.write_bytes(Path(get_testdata_file('MR_small.dcm')).read_bytes())
    gone.unlink()
    added = arc/'site2'/'new.dcm'; shutil.copy(get_testdata_file('CT_small.dcm'), added)
    st = junk.stat(); junk.write_bytes(b'\0' * st.st_size); os.utime(junk, ns=(st.st_atime_ns, st.st_mtime_ns))
    r2 = index_dicoms(arc, client=client, to=idx, partition_size=6)
    assert (r2['files'], r2['read'], r2['kept'], r2['removed'], r2['rows']) == (n, 2, n-2, 1, n)
    again = _read_sorted(idx).set_index('fname')
    assert again.loc[str(changed), 'Modality'] == 'MR' and again.loc[str(added), 'Modality'] == 'CT'
    assert str(gone) not in again.index
    assert pd.isna(again.loc[str(junk), 'error']) and again.loc[str(junk), 'SOPInstanceUID'] == back.set_index('fname').loc[str(junk), 'SOPInstanceUID']
    assert again.index.is_unique
    # a third run changes nothing and reads nothing
    r3 = index_dicoms(arc, client=client, to=idx, partition_size=6)
    assert (r3['read'], r3['kept'], r3['rows']) == (0, n, n)
    with pytest.raises(ValueError, match='indexed with'): index_dicoms(arc, to=idx, frames=True)

def test_parquet_parts_share_one_schema(tmp_path):
    "A column that is a number in one part and text in another is text in every part, so the folder reads as one table."
    _need('pyarrow', 'scale')
    rows_a = [{'fname': 'a', 'X': 1, 'error': None}]
    rows_b = [{'fname': 'b', 'X': 'one', 'Y': (1.5, 2), 'error': 'E'}]
    ta, tb = core._arrow_table(rows_a, ['fname']), core._arrow_table(rows_b, ['fname'])
    schema = core._unify([ta.schema, tb.schema], ['fname'])
    assert str(schema.field('X').type) == 'string' and str(schema.field('Y').type) == 'list<item: double>'
    for name,t in (('a', ta), ('b', tb)): core._write_table(core._conform(t, schema), tmp_path/f'part-{name}.parquet')
    df = pd.read_parquet(tmp_path)
    assert df.X.tolist() == ['1', 'one'] and list(df.columns) == ['fname', 'X', 'Y', 'error', 'file_size', 'file_mtime_ns']

# ---- convert / anonymize as Dask tasks
from fastdcm.export import convert, anonymize
import sys; sys.path.insert(0, str(Path(__file__).parent))
from test_export import make_tree, SALT

def _tree_bytes(root):
    "{relative path: bytes} of every file under `root` (hidden journal and settings included, the lock's empty file too)."
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob('*')) if p.is_file()}

def test_dask_convert_and_anonymize_byte_identical(tmp_path, client):
    src = make_tree(tmp_path/'src', corrupt=True)
    for i in range(6): shutil.copy(next(src.rglob('IM0001')), src/'Smith_John'/'study1'/f'copy{i}.dcm')   # duplicates: settled once
    before = _tree_bytes(src)
    for fmt in ('png16', 'npy'):
        a = convert(src, tmp_path/f'local_{fmt}', fmt, salt=SALT, progress=False, workers=0)
        b = convert(src, tmp_path/f'dask_{fmt}', fmt, salt=SALT, progress=False, client=client)
        assert a['failed'] and a == {**b, 'metadata': a['metadata']}                       # one failure report, the same
        assert _tree_bytes(tmp_path/f'local_{fmt}') == _tree_bytes(tmp_path/f'dask_{fmt}')
    a = convert(src, tmp_path/'anon_local', anonymize=True, salt=SALT, progress=False, workers=0)
    b = convert(src, tmp_path/'anon_dask', anonymize=True, salt=SALT, progress=False, client=client)
    assert _tree_bytes(tmp_path/'anon_local') == _tree_bytes(tmp_path/'anon_dask')
    a = anonymize(src, tmp_path/'dcm_local', salt=SALT, progress=False, workers=0)
    b = anonymize(src, tmp_path/'dcm_dask', salt=SALT, progress=False, client=client)
    assert a == b and a['done'] == 6 and a['failed']
    assert _tree_bytes(tmp_path/'dcm_local') == _tree_bytes(tmp_path/'dcm_dask')
    assert _tree_bytes(src) == before                                                      # the source never written

def test_dask_convert_resumes(tmp_path, client):
    "A run cut short (outputs removed, a half-written temporary file left) is finished by a Dask run: only the missing outputs are written."
    src = make_tree(tmp_path/'src')
    convert(src, tmp_path/'ref', salt=SALT, progress=False, workers=0)
    out = tmp_path/'out'
    convert(src, out, salt=SALT, progress=False, client=client)
    pngs = sorted(out.rglob('*.png'))
    for p in pngs[:3]: p.unlink()
    (pngs[4].parent/f'.{pngs[4].name}.999.fastdcm-tmp').write_bytes(b'half')             # a worker killed mid-write
    r = convert(src, out, salt=SALT, progress=False, client=client)
    assert (r['done'], r['skipped'], r['failed']) == (3, 3, [])
    assert _tree_bytes(out) == _tree_bytes(tmp_path/'ref')

def test_dask_convert_survives_a_killed_worker(tmp_path, client):
    "A worker process killed (SIGKILL) while writing: Dask reruns its tasks elsewhere, and the outputs are the same bytes."
    import signal, threading, time
    src = tmp_path/'src'
    for i in range(40): _ct(src/f'pat{i%4}'/f'im{i:02d}.dcm', i, size=256)
    convert(src, tmp_path/'ref', salt=SALT, progress=False, workers=0)
    out, res, killed = tmp_path/'out', {}, []
    run = threading.Thread(target=lambda: res.update(convert(src, out, salt=SALT, progress=False, client=client)))
    pids = client.run(os.getpid)
    run.start()
    for _ in range(3000):                                          # at the first output written, kill a worker
        if any(out.rglob('*.png')) or not run.is_alive(): break
        time.sleep(0.005)
    if run.is_alive(): os.kill(next(iter(pids.values())), signal.SIGKILL); killed.append(True)
    run.join(120)
    assert killed, 'the run ended before a worker could be killed'
    if not res or res['failed']: res = convert(src, out, salt=SALT, progress=False, client=client)   # resume if Dask gave up
    assert (res['done'] + res['skipped'], res['failed']) == (40, [])
    assert _tree_bytes(out) == _tree_bytes(tmp_path/'ref')                          # no temporary file left either
    client.wait_for_workers(2, timeout=60)                        # the nanny restarts it for the tests that follow

# ---- object storage: a real S3-protocol server (moto) on the loopback interface
@pytest.fixture(scope='module')
def s3():
    "moto's S3 server on 127.0.0.1 (a free port), and the storage options that reach it; stopped after the module."
    _need('s3fs', 'cloud')
    server_mod = pytest.importorskip('moto.server', reason='needs moto[server] (in the dev extra)')
    server = server_mod.ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    so = {'key': 'testing', 'secret': 'testing', 'client_kwargs': {'endpoint_url': f'http://{host}:{port}', 'region_name': 'eu-west-1'}}
    import s3fs
    fs = s3fs.S3FileSystem(**so); fs.mkdir('scans')
    yield fs, so
    server.stop()

def _ct(fn, seed, long_private=0, size=512):
    "A CT with `size`^2 pixels (most of the file) and optionally a private OB element of `long_private` bytes before Patient ID and Rows."
    ds = pydicom.dcmread(get_testdata_file('CT_small.dcm'))
    ds.Rows = ds.Columns = size
    ds.PixelData = np.random.default_rng(seed).integers(-1000, 2000, (size, size)).astype(np.int16).tobytes()
    ds.PatientID, ds.SOPInstanceUID = f'P{seed%3}', pydicom.uid.generate_uid(entropy_srcs=[str(seed)])
    if long_private:
        ds.add_new(0x00090010, 'LO', 'FASTDCM TEST')
        ds.add_new(0x00091010, 'OB', bytes(long_private))
    Path(fn).parent.mkdir(parents=True, exist_ok=True); ds.save_as(fn, enforce_file_format=True)
    return Path(fn)

@pytest.fixture(scope='module')
def s3_archive(s3, tmp_path_factory):
    "The same archive on disk and in the bucket: 6 CTs of 512x512 in two patient folders, one with a 100 KB private element in its header."
    fs, so = s3
    local = tmp_path_factory.mktemp('s3src')/'arc'
    for i in range(6): _ct(local/f'pat{i%2}'/f'im{i}.dcm', i, long_private=100_000 if i==3 else 0)
    fs.put(str(local), 'scans/arc', recursive=True)
    return local, 's3://scans/arc', so

def _count_ranged(monkeypatch):
    "Count the bytes s3fs fetches through ranged reads of open objects."
    import s3fs.core
    seen = []
    orig = s3fs.core.S3File._fetch_range
    def counting(self, start, end):
        seen.append((self.path, start, end)); return orig(self, start, end)
    monkeypatch.setattr(s3fs.core.S3File, '_fetch_range', counting)
    return seen

def test_s3_listing_and_header_index_with_ranged_reads(s3_archive, monkeypatch):
    local, url, so = s3_archive
    urls = get_dicom_files(url, storage_options=so)
    assert [u.split('/arc/')[1] for u in urls] == [p.relative_to(local).as_posix() for p in get_dicom_files(local)]
    seen = _count_ranged(monkeypatch)
    remote = index_dicoms(url, storage_options=so, progress=False, n_workers=0)
    here = index_dicoms(local, progress=False, n_workers=0)
    pd.testing.assert_frame_equal(remote.drop(columns='fname'), here.drop(columns='fname'))
    assert remote.error.isna().all() and remote.PatientID.tolist() == here.PatientID.tolist()   # read past the 100 KB element
    total = sum(p.stat().st_size for p in local.rglob('*.dcm'))
    read = sum(e-s for _,s,e in seen)
    assert {p for p,_,_ in seen} == {u[len('s3://'):] for u in urls}       # every object's header was read...
    assert read < total/4, (read, total)                                  # ...not the objects (each 512 KB of pixels)
    for u in urls:                                                        # a short header: one block, or two at most
        if not u.endswith('im3.dcm'): assert sum(e-s for p,s,e in seen if p==u[len('s3://'):]) <= 2*core.HEADER_BLOCK
    long = [e-s for p,s,e in seen if p.endswith('im3.dcm')]
    assert sum(long) > 100_000 and len(long) > 1                          # the long header: extended, block by block

def test_s3_pixels_convert_and_dask(s3_archive, client, tmp_path):
    local, url, so = s3_archive
    urls = get_dicom_files(url, storage_options=so)
    from fastdcm.pixels import dicom_pixels
    np.testing.assert_array_equal(dicom_pixels(urls[0], storage_options=so), dicom_pixels(get_dicom_files(local)[0]))
    with pytest.raises(FileNotFoundError, match='nothere.dcm'): dcmread(url + '/nothere.dcm', storage_options=so)
    # convert from the bucket = convert from the disk, byte for byte (the source names are the same relative paths)
    convert(url, tmp_path/'from_s3', salt=SALT, progress=False, storage_options=so)
    convert(local, tmp_path/'from_disk', salt=SALT, progress=False, workers=0)
    assert _tree_bytes(tmp_path/'from_s3') == _tree_bytes(tmp_path/'from_disk')
    # Dask workers read the bucket too, with the storage options handed to them
    pd.testing.assert_frame_equal(index_dicoms(url, client=client, storage_options=so, partition_size=2),
                                  index_dicoms(url, storage_options=so, progress=False))

def test_s3_train_one_batch(s3_archive, monkeypatch):
    "A DicomBlock reads s3:// URLs with the credentials from fsspec's configuration (as a user sets them), and a learner trains on them."
    fastai_vision = pytest.importorskip('fastai.vision.all')
    import fsspec, torch
    local, url, so = s3_archive
    monkeypatch.setitem(fsspec.config.conf, 's3', so)
    from fastdcm.transforms import DicomBlock
    from fastai.vision.all import DataBlock, CategoryBlock, ColReader, RandomSplitter, Learner, nn, CrossEntropyLossFlat
    df = index_dicoms(url, progress=False, storage_options=so)
    df['label'] = df.PatientID
    dls = DataBlock(blocks=(DicomBlock(), CategoryBlock), get_x=ColReader('fname'), get_y=ColReader('label'),
                    splitter=RandomSplitter(0.34, seed=0)).dataloaders(df, bs=2, num_workers=0)
    xb, yb = dls.one_batch()
    assert xb.shape == (2, 1, 512, 512)
    assert torch.isfinite(xb).all() and float(xb.abs().max()) > 100
    model = nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(64, dls.c))
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat())
    learn.fit(1, lr=1e-3)
    assert np.isfinite(learn.recorder.values[-1][0])

def test_s3_decode_cache(s3_archive, tmp_path, monkeypatch):
    "DecodeCache keys an s3:// object by its size, time and ETag (a metadata request): the second read is a hit that downloads nothing, and a replaced object is decoded again."
    from fastdcm.cache import DecodeCache
    from fastdcm.pixels import dicom_pixels
    import s3fs
    local, url, so = s3_archive
    fs = s3fs.S3FileSystem(**so)                                  # fsspec's cached instance: the one the cache's reads use
    gets = []
    for m in ('cat_file', 'open'):
        def counting(path, *a, _orig=getattr(fs, m), _m=m, **k): gets.append((_m, path)); return _orig(path, *a, **k)
        monkeypatch.setattr(fs, m, counting)
    src = get_dicom_files(url, storage_options=so)[0]
    cache = DecodeCache(tmp_path/'c', storage_options=so)
    want = dicom_pixels(get_dicom_files(local)[0])
    np.testing.assert_array_equal(cache(src), want)
    assert gets == [('cat_file', src[len('s3://'):])]                        # a miss fetched the object...
    np.testing.assert_array_equal(cache(src), want)
    assert (cache.hits, cache.misses, len(gets)) == (1, 1, 1)                 # ...a hit fetched nothing
    other = tmp_path/'other.dcm'; _ct(other, 99)
    fs.put(str(other), 'scans/replaced/im.dcm'); first = cache('s3://scans/replaced/im.dcm')
    fs.put(str(_ct(tmp_path/'other2.dcm', 98)), 'scans/replaced/im.dcm')     # same name, new object
    np.testing.assert_array_equal(cache('s3://scans/replaced/im.dcm'), dicom_pixels(tmp_path/'other2.dcm'))
    assert cache.misses == 3 and not np.array_equal(first, dicom_pixels(tmp_path/'other2.dcm'))
    with pytest.raises(FileNotFoundError, match='nothere.dcm'): cache(url + '/nothere.dcm')

# ---- training on two processes (gloo, CPU) with fastdcm.distributed
_TRAIN = '''
import os, sys, json, hashlib, torch
from pathlib import Path
from fastai.vision.all import *
from fastdcm.core import index_dicoms
from fastdcm.data import DicomDataLoaders
from fastdcm.distributed import distrib_ctx, shared_seed, check_split, split_digest
torch.manual_seed(0)
df = index_dicoms(sys.argv[1], progress=False, n_workers=0)
df['label'] = df.PatientID.map(lambda p: int(p[1:]) % 2)
dls = DicomDataLoaders.from_df(df, valid_pct=0.2, seed=shared_seed(), bs=4, num_workers=0, device='cpu')   # seed=None
valid = sorted(Path(f).name for f in dls.valid.items.fname)
leaks = len(check_split(dls))                     # the split every rank holds (checked across ranks), for leakage
own = DicomDataLoaders.from_df(df, valid_pct=0.2 * (1 + int(os.environ['RANK'])), seed=0, bs=4, num_workers=0, device='cpu')
try: check_split(own); mismatch = ''                 # ranks with splits of their own: every rank must refuse
except ValueError as e: mismatch = str(e)
refused = ''
try:
    with distrib_ctx(Learner(own, nn.Sequential(nn.Flatten(), nn.LazyLinear(2)), loss_func=CrossEntropyLossFlat())): pass
except ValueError as e: refused = str(e)             # distrib_ctx refuses them too, before any training
model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.LayerNorm(16), nn.Linear(16, 2))   # HU in, logits of order 1 out
learn = Learner(dls, model, loss_func=CrossEntropyLossFlat())
with distrib_ctx(learn): learn.fit(1, 1e-3)
res = {'rank': int(os.environ['RANK']), 'valid': valid, 'leaks': leaks, 'digest': split_digest(dls), 'mismatch': mismatch, 'refused': refused, 'values': [list(map(float, v)) for v in learn.recorder.values],
       'validate': float(learn.validate()[0])}
Path(sys.argv[2], f"rank{os.environ['RANK']}.json").write_text(json.dumps(res))   # not stdout: progress bars interleave there
'''

def test_two_process_training_on_cpu(tmp_path):
    "torchrun with 2 CPU processes (gloo): both ranks use the same patient split (`check_split` agrees and finds no leak; it refuses splits of each rank's own), the fit ends with finite losses, and the reported validation loss is the one a single process computes with the same weights."
    pytest.importorskip('accelerate', reason='multi-process training needs accelerate (in the dev extra)')
    import subprocess, sys, json, socket
    for i in range(15):                          # 5 patients of 3 images: the one valid patient's 3 don't split in 2
        _ct(tmp_path/'data'/f'pat{i%5}'/f'im{i:02d}.dcm', i, size=32)
        ds = pydicom.dcmread(tmp_path/'data'/f'pat{i%5}'/f'im{i:02d}.dcm'); ds.PatientID = f'P{i % 5}'; ds.save_as(ds.filename)
    (tmp_path/'train.py').write_text(_TRAIN)
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
                        '--master_port', str(port), str(tmp_path/'train.py'), str(tmp_path/'data'), str(tmp_path)],
                       capture_output=True, text=True, timeout=240, env=env)
    res = [json.loads(f.read_text()) for f in sorted(tmp_path.glob('rank*.json'))]
    assert p.returncode == 0 and len(res) == 2, p.stderr[-3000:]
    a, b = sorted(res, key=lambda r: r['rank'])
    assert a['valid'] == b['valid'] and len(a['valid']) == 3                             # one split for every rank
    assert a['digest'] == b['digest'] and (a['leaks'], b['leaks']) == (0, 0)              # check_split: the same, no leak
    assert "ranks [0] | [1]" in a['mismatch'] and b['mismatch'] == a['mismatch']          # and splits of their own refused
    assert a['refused'] == b['refused'] == a['mismatch']                                  # by distrib_ctx as well
    assert a['values'] == b['values'] and all(np.isfinite(v) for v in a['values'][-1])
    assert a['validate'] > 0.01                                                          # a loss that can tell
    assert a['values'][-1][1] == pytest.approx(a['validate'], rel=1e-5)                 # the real validation loss
    assert b['validate'] == pytest.approx(a['validate'], rel=1e-6)

def test_s3_dicom_dataloaders(s3_archive, monkeypatch):
    "DicomDataLoaders.from_df on s3:// URLs (credentials from fsspec's configuration)."
    import fsspec
    local, url, so = s3_archive
    monkeypatch.setitem(fsspec.config.conf, 's3', so)
    from fastdcm.data import DicomDataLoaders
    df = index_dicoms(url, progress=False, storage_options=so)
    df['label'] = df.PatientID
    dls = DicomDataLoaders.from_df(df, valid_pct=0.34, seed=0, bs=2, num_workers=0, device='cpu')
    xb, yb = dls.one_batch()
    assert xb.shape == (2, 1, 512, 512)

def test_lower_layer_imports_no_scale_extra():
    "core, pixels and export import Dask, fsspec, s3fs, accelerate (and fastai) only when a client or a URL is given."
    import subprocess, sys
    code = ("import sys, fastdcm.core, fastdcm.pixels, fastdcm.export; "
            "print(sorted(m for m in ('dask', 'distributed', 'fsspec', 's3fs', 'accelerate', 'fastai') if m in sys.modules))")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == '[]', out.stdout + out.stderr[-2000:]

def test_s3_png_and_png16_items(s3, tmp_path, monkeypatch):
    "PNG beside DICOM in a bucket: a foreign 8-bit PNG and a fastdcm png16 export at s3:// URLs open as they do from disk (the png16 at its exact values, its stage kept)."
    import fsspec, PIL.Image
    from fastdcm.transforms import open_dicom, is_image_file
    from fastdcm.export import write_converted
    fs, so = s3
    monkeypatch.setitem(fsspec.config.conf, 's3', so)
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (16, 20), dtype=np.uint8)).save(tmp_path/'film.png')
    write_converted(tmp_path/'ct.png', rng.normal(0, 300, (16, 20)).astype(np.float32), 'png16', stage='modality')
    fs.put(str(tmp_path/'film.png'), 'scans/img/film.png'); fs.put(str(tmp_path/'ct.png'), 'scans/img/ct.png')
    for name, source, stage in [('film.png', 'foreign', 'display'), ('ct.png', 'png16', 'modality')]:
        url = f's3://scans/img/{name}'
        assert is_image_file(url)
        remote, local = open_dicom(url), open_dicom(tmp_path/name)
        assert torch_equal(remote, local)
        assert (remote.source, remote.stage) == (source, stage)
    with pytest.raises(FileNotFoundError, match='missing.png'): open_dicom('s3://scans/img/missing.png')

def torch_equal(a, b):
    import torch
    return a.shape == b.shape and torch.equal(a.as_subclass(torch.Tensor), b.as_subclass(torch.Tensor))
