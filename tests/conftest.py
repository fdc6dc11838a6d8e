import os

# Triton kernels run on the CPU under the interpreter in CI; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A live server on the tiny model (server_harness), one per test module; limits in TINY_SERVER_LIMITS."""
    from server_harness import TINY_SERVER_LIMITS, ThreadServer, write_tiny_model
    srv = ThreadServer(write_tiny_model(tmp_path_factory.mktemp("tiny")), TINY_SERVER_LIMITS)
    yield srv
    srv.stop()
