"""Shared fixtures: a daemon per test, and one per module for read-mostly tests."""

from __future__ import annotations

import llama_cpp  # noqa: F401 -- before numpy (test modules, gguf): see the imports of rbeed/worker.py
import pytest

from support import start_daemon

pytest_plugins = ["user_systemd"]  # the `user_systemd` fixture: a real systemd user manager


@pytest.fixture
def daemon(tmp_path):
    d = start_daemon(tmp_path / "d")
    yield d
    d.stop()


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory):
    """One daemon for a module's read-mostly tests (saves a start per test)."""
    d = start_daemon(tmp_path_factory.mktemp("shared"))
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The tiny random llama GGUF (tests/tinymodel.py), written once per session."""
    import tinymodel

    return tinymodel.write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.gguf")
