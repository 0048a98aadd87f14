"""Shared pytest fixtures: paths to the repo, its resources, and the optional shared data."""

import os
import pathlib
import sys

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
RESOURCES = REPO_ROOT / "resources"
# CI puts shared/ beside the clone; ROBERTA_ZH_SHARED_DATA overrides.
SHARED_DATA = pathlib.Path(os.environ.get("ROBERTA_ZH_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data():
    """The shared data folder; tests that need it are skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def google_vocab(shared_data):
    path = shared_data / "vocab" / "vocab.txt"
    if not path.is_file():
        pytest.skip(f"Google vocab not found at {path}")
    return path


@pytest.fixture(scope="module")
def pretraining_data(tmp_path_factory):
    """Pretraining train/eval records from real text, tiny configs and the vocab (helpers.py)."""
    import helpers
    return helpers.make_pretraining_data(tmp_path_factory.mktemp("pretraining_data"))
