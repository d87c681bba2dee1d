"""notebooks/quickstart.ipynb runs top to bottom, so the documented workflow cannot rot."""

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_notebook_executes(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("MOECOMPRESS_ROOT", str(ROOT))
    monkeypatch.setenv("MOECOMPRESS_WORK", str(tmp_path / "work"))
    if not os.environ.get("MOECOMPRESS_NOTEBOOK_REFERENCE"):
        monkeypatch.setenv("MOECOMPRESS_REFERENCE", str(tmp_path / "no-reference"))  # CI: train the mini one
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "routed_experts" in outputs and "pruned-w4" in outputs
