import pytest


@pytest.fixture(scope="session")
def demo_cache_dir(pytestconfig, tmp_path_factory):
    """Where demo tests keep frozen outputs (MiniLM embeddings of the ImageNet names, trunk outputs):
    pytest's cache folder, shared by the demo test files and kept between runs; a temporary folder
    when the cache plugin is off (``-p no:cacheprovider``)."""
    cache = getattr(pytestconfig, "cache", None)
    return cache.mkdir("promptkd-demo") if cache is not None else tmp_path_factory.mktemp("promptkd-demo")
