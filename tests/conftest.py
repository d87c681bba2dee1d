import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MOECOMPRESS_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), "moecompress-test-cache"))

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private moecompress cache per test, so cache hits are never inherited from another test."""
    d = tmp_path / "cache"
    monkeypatch.setenv("MOECOMPRESS_CACHE", str(d))
    return d
