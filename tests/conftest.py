"""Shared pytest setup: every test starts from its own fixed random state, and hypothesis replays a fixed set of
examples, so a CI run is reproducible. `HYPOTHESIS_PROFILE=explore pytest tests` searches with fresh random
examples to look for new failures; pin what it finds with `@example`. Also the helpers for pydicom's installed test files (nothing downloaded)."""
import os, random, zlib
from pathlib import Path
import numpy as np, pytest, torch
from pydicom.data import get_testdata_file
from hypothesis import settings

settings.register_profile('ci', derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile('explore', derandomize=False, deadline=None, print_blob=True)
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci'))

@pytest.fixture(autouse=True)
def _seed_everything(request):
    "Seed python, numpy and torch from the test's id: each test has its own, repeatable, random state."
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed); np.random.seed(seed % 2**32); torch.manual_seed(seed)
    yield

def installed_test_files(pattern='*.dcm'):
    "pydicom's test files as installed: its own folder, and pydicom-data's when that package is installed. Nothing is downloaded (`get_testdata_files` would try to fetch every file pydicom-data has online)."
    from pydicom.data.data_manager import external_data_sources, DataTypes
    own = sorted(str(p) for p in Path(get_testdata_file('CT_small.dcm')).parent.glob(pattern))
    extra = [p for src in external_data_sources().values() for p in src.get_paths(pattern, DataTypes.DATASET)]
    return own + sorted(extra)

@pytest.fixture
def no_downloads(monkeypatch):
    "Fail a test that makes pydicom try to download test data (it swallows the network error and only warns)."
    import pydicom.data.data_manager as dm
    tried = []
    monkeypatch.setattr(dm, 'data_path_with_download', lambda name, *a, **k: tried.append(name) or (_ for _ in ()).throw(OSError('no network')))
    yield tried
    assert not tried, f'pydicom tried to download {len(tried)} test files, e.g. {tried[:3]}'
