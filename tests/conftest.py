import os
import shutil
import subprocess

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. It must be set
# before anything imports triton (torchrec does), so it is decided here, not in the tests.
if "TRITON_INTERPRET" not in os.environ:
    smi = shutil.which("nvidia-smi")
    if smi is None or subprocess.run([smi, "-L"], capture_output=True).returncode != 0:
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores here: keep intra-op threads bounded so multi-process tests do not oversubscribe.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
