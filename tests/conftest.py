"""Fixtures shared by the test modules."""
import pytest

from onnxcomp import testing


@pytest.fixture(scope="session")
def minilm():
    """Path of the real MiniLM-L3 fixture; the test is skipped when its PyPI package is not installed."""
    try:
        return testing.minilm_path()
    except testing.FixtureUnavailable as e:
        pytest.skip(str(e))
