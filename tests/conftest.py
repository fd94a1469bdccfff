from __future__ import annotations

import os

import pytest

from .server import ServerHandle, run_server

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def demo_server() -> ServerHandle:
    """A real Jupyter server with the two demo models (llama.cpp on the CPU), shared by the session."""
    with run_server() as server:
        server.wait_models()
        yield server
