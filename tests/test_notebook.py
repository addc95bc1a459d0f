"""notebooks/quickstart.ipynb runs from top to bottom in a fresh kernel, and its printed results hold."""
import os
import signal

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_notebook_runs_end_to_end(tmp_path):
  nbclient = pytest.importorskip("nbclient")
  import nbformat
  notebook = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
  handler = signal.getsignal(signal.SIGINT)
  try:
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
  finally:
    signal.signal(signal.SIGINT, handler)  # jupyter's kernel manager installs its own
  text = "\n".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.outputs)
  assert "trained to step 40" in text and "same images: True" in text
  mean, std = (float(text.split(name)[1].split()[0]) for name in ("mean ", "std "))
  assert abs(mean - 0.5) < 0.01 and abs(std - 0.2) < 0.01  # Heun on the exact denoiser, 20,000 samples
  images = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
            if "image/png" in output.get("data", {})]
  assert len(images) == 2  # the two grids
