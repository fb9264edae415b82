"""CI, run from a directory outside the repository: the installed fastformers (not this checkout)
imports, runs one op on its C++ backend, and installs the ``fastformers`` command."""
import pathlib
import subprocess
import sys

import torch

import fastformers
from fastformers.ops.feedback import naive
from fastformers.ops.feedback.op import feedback_memory

checkout = pathlib.Path(__file__).resolve().parents[1]
package = pathlib.Path(fastformers.__file__).resolve().parent
# the checkout's own source tree; the virtualenv may live inside the checkout (.venv), and what is
# installed into its site-packages is the installed package
if package == checkout / "fastformers":
    sys.exit(f"fastformers was imported from the checkout ({package}), not from the installed package")
if "cpp" not in fastformers.available_backends():
    sys.exit(f"the installed fastformers has no C++ extension (backends: {fastformers.available_backends()})")
layer_outputs, weights = torch.randn(3, 2, 8), torch.randn(3)
torch.testing.assert_close(feedback_memory(layer_outputs, weights, backend="cpp"),
                           naive.feedback_memory(layer_outputs, weights))
subprocess.run(["fastformers", "--help"], check=True, stdout=subprocess.DEVNULL)
print(f"installed fastformers works: {package}, backends {', '.join(fastformers.available_backends())}")
