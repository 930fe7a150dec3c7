"""Fixtures shared by the test modules."""
import pytest

from onnxcomp import testing


def _or_skip(path_of):
    """The fixture's path; the test is skipped when it cannot be built here (its PyPI package is missing)."""
    try:
        return path_of()
    except testing.FixtureUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def minilm():
    """Path of the real MiniLM-L3 fixture; the test is skipped when its PyPI package is not installed."""
    return _or_skip(testing.minilm_path)


@pytest.fixture(scope="session")
def fused():
    """Path of MiniLM-L3 through ORT's transformers optimizer (built from the MiniLM fixture when missing)."""
    return _or_skip(testing.minilm_fused_path)

