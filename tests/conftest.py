"""Shared fixtures: tiny built-in data, a trained tiny model and its index, the notebook kernel. The helpers the
tests import (the tiny settings, the composed config, a ``train.py`` run) are in ``tests/helpers.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Never reach the network from tests: timm's hub and W&B.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One cache of generated built-in data shared by the whole session."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A trained tiny checkpoint, its gallery and index (see ``tests.search_fixtures``), built once per session."""
    from tests.search_fixtures import tiny_search_setup  # imports torch and the search package: only when used

    return tiny_search_setup(tmp_path_factory.getbasetemp() / "search")


@pytest.fixture(scope="session")
def embedder(tiny):
    """The tiny checkpoint's embedder (read-only: the search tests share it)."""
    from metricsearch.inference.model_loading import load_embedder

    return load_embedder(ckpt=tiny.ckpt)


@pytest.fixture(scope="session")
def faiss_index(tiny):
    """The tiny gallery's faiss index, as loaded from its folder (read-only: tests that change one copy it)."""
    from metricsearch.search.index import GalleryIndex

    return GalleryIndex.load(tiny.index_dir)


@pytest.fixture
def release_milvus():
    """Closes the Milvus Lite files a test opened, so the suite never holds dozens of embedded servers (a module
    uses it with ``pytestmark = pytest.mark.usefixtures("release_milvus")``)."""
    yield
    from metricsearch.search.milvus_index import release_all

    release_all()


@pytest.fixture(scope="session")
def python3_kernel() -> str:
    """The ``python3`` kernel of this interpreter (ipykernel installs it into ``<venv>/share/jupyter``), for the
    notebook tests."""
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix"], check=True, capture_output=True)
    return "python3"
