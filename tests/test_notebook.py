"""The Colab quickstart notebook, executed top to bottom on the CPU in a real Jupyter kernel."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO_ROOT / "notebooks" / "colab_tpu_quickstart.ipynb"


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    # conftest forces 8 host devices for the sharding tests; the notebook should see the one
    # CPU device a user's CPU runtime has.
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    # The checkout, not whatever copy of the package the environment may hold.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # An MPLBACKEND=Agg inherited from the shell would swallow the figure.
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    return env


def _tagged(nb: nbformat.NotebookNode, tag: str) -> list[nbformat.NotebookNode]:
    return [cell for cell in nb.cells if tag in cell.get("metadata", {}).get("tags", [])]


def _stdout(cell: nbformat.NotebookNode) -> str:
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


@pytest.mark.slow
def test_notebook_runs_on_cpu():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        timeout=900,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO_ROOT)}},
    )
    start = time.perf_counter()
    client.execute(env=_kernel_env())  # raises CellExecutionError on the first failing cell
    print(f"notebook ran in {time.perf_counter() - start:.0f} s", file=sys.stderr)

    (decode,) = _tagged(nb, "decode")
    text = _stdout(decode)
    sections = text.split("=== ")[1:]
    assert [s.split(" ===")[0] for s in sections] == ["full attention", "TriAttention (budget 128)"], text[:500]
    for section in sections:
        generated = section.split(" ===\n", 1)[1].split("\n--- ")[0]
        assert generated.strip(), f"empty generation in {section[:200]}"
        assert "tok/s wall" in section and "MiB" in section

    (summary,) = _tagged(nb, "summary")
    assert "TriAttention's KV buffer is" in _stdout(summary)

    (plot,) = _tagged(nb, "plot")
    assert any(out.output_type == "display_data" and "image/png" in out.get("data", {}) for out in plot.outputs)

    # The CPU run must not have taken the TPU-only branches.
    for cell in _tagged(nb, "tpu"):
        assert "TPU memory" not in _stdout(cell) and "GiB usable" not in _stdout(cell)
