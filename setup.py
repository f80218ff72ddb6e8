from setuptools import setup

# Scipion pins numpy 1.26.1, which has no wheels for Python >= 3.13: there the plugin tests skip
SCIPION = [f'{name}; python_version < "3.13"' for name in
           ("scipion-pyworkflow>=3.11", "scipion-em>=3.11", "scipion-em-relion>=5")]

setup(
    name="cryocv",
    version="0.1.0",
    description="GPU-accelerated cryo-EM 3D refinement (NU, local, symmetry relaxation, ab-initio) "
                "with a Scipion plugin",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=["cryocv", "cryocv.io", "cryocv.jobs", "cryocv.protocols", "cryocv.viewers", "cryocv.tests"],
    package_dir={"cryocv": "cryocv", "cryocv.protocols": "protocols", "cryocv.viewers": "viewers",
                 "cryocv.tests": "tests"},
    package_data={"cryocv": ["data/*.mrc.gz", "protocols.conf"]},
    install_requires=["numpy>=1.26", "scipy>=1.9", "mrcfile>=1.4", "starfile>=0.5", "pandas>=1.5",
                      "tqdm>=4.60", "matplotlib>=3.7"],
    extras_require={
        "gpu": ["cupy-cuda12x>=13"],
        "scipion": SCIPION,
        # the Scipion stack is part of the tests (headless projects); it pins numpy 1.26,
        # the oldest numpy the core supports
        "test": ["pytest>=7", "gemmi>=0.6", "cryosparc-tools>=4"] + SCIPION,
    },
    entry_points={
        "console_scripts": ["cryocv = cryocv.cli:main"],
        "pyworkflow.plugin": ["cryocv = cryocv"],
    },
)
