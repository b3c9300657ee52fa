"""Shared pytest setup: every test starts from its own fixed random state, and hypothesis replays a fixed set of
examples, so a CI run is reproducible. `HYPOTHESIS_PROFILE=explore pytest tests` searches with fresh random
examples to look for new failures; pin what it finds with `@example`."""
import os, random, zlib
import numpy as np, pytest, torch
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
