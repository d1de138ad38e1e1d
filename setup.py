from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec(Path("causalclipseg/version.py").read_text(), version)

setup(
    name="causalclipseg",
    version=version["__version__"],
    description="Text-prompted lesion segmentation (CausalCLIPSeg) on open_clip encoders, with MONAI tooling",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["causalclipseg", "causalclipseg.*"]),
    package_data={"causalclipseg": ["model_configs/*.json", "weights/*"]},
    install_requires=[
        "torch>=2.2",
        "torchvision",
        "open_clip_torch>=2.26",
        "monai>=1.4",
        "pytorch-ignite>=0.4.11",
        "nibabel>=5",
        "pydicom>=2.4",
        # DICOM Segmentation objects (predict --dicom-seg, the bundle's dicom_seg): 0.23+ need pydicom 3, 0.22.0 is the
        # last for pydicom 2 (>=2.3, not 2.4.0); unpinned, so that pip picks the newest one the pydicom allows
        "highdicom>=0.22",
        "pynrrd",
        "fire",
        "numpy",
        "pillow",
        "openpyxl",
        "tqdm",
        "tensorboard",
        "safetensors",
    ],
    extras_require={
        # setuptools: tests/test_packaging.py builds the wheel and the sdist offline (bdist_wheel without `wheel`)
        "test": ["pytest>=7", "fvcore", "jsonschema", "ruff", "setuptools>=70.1"],
        # MONAI Label app (monailabel_app/): 0.8.5 starts only with pydicom 2, dicomweb-client 0.59.1, pynetdicom 2
        "monailabel": ["monailabel==0.8.5", "pydicom>=2.4,<3", "dicomweb-client[gcp]==0.59.1", "pynetdicom<3",
                       "psutil"],
    },
    entry_points={"console_scripts": ["causalclipseg=causalclipseg.cli:main"]},
)
