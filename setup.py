"""Package list of the wheel (the rest of the metadata is in pyproject.toml).

The DLRM example trainer (``examples/dlrm``) ships as ``torchrec_lowprec_examples.dlrm`` so
that ``python -m torchrec_lowprec_examples.dlrm.train`` and the TorchX component
``torchrec_lowprec.dlrm`` run without a checkout; pyproject.toml alone cannot map a folder
under a new name while also finding the library's subpackages.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=[
        *find_namespace_packages(
            include=["torchrec_lowprec", "torchrec_lowprec.*"], exclude=["*.__pycache__"]
        ),
        "torchrec_lowprec_examples.dlrm",
    ],
    package_dir={"torchrec_lowprec_examples.dlrm": "examples/dlrm"},
)
