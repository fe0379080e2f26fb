import pytest
from reid_fixtures import write_market1501


@pytest.fixture(scope="session")
def market_root(tmp_path_factory):
    """A tiny Market-1501-layout dataset of real JPEG files (see reid_fixtures.write_market1501)."""
    return write_market1501(str(tmp_path_factory.mktemp("datasets")))
