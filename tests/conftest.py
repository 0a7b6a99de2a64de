"""Shared pytest configuration."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

from tests.tiny_models import tiny_model, tiny_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests never read calibration statistics cached by an earlier run (or by the user): one fresh cache per session.
os.environ["RANKWISE_CALIBRATION_CACHE"] = tempfile.mkdtemp(prefix="rankwise-test-calibration-")
atexit.register(shutil.rmtree, os.environ["RANKWISE_CALIBRATION_CACHE"], ignore_errors=True)
os.environ["RANKWISE_LATENCY_CACHE"] = tempfile.mkdtemp(prefix="rankwise-test-latency-")
atexit.register(shutil.rmtree, os.environ["RANKWISE_LATENCY_CACHE"], ignore_errors=True)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Small problems: one torch thread (a second only adds OpenMP spin-waiting on a busy 2-core machine, 20-40x
    slower in places), restored after. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama with its tokenizer saved as a Hugging Face directory (one per test module)."""
    path = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
