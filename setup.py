"""The one build entry of blip-fast: the Python package plus the optional native extension.

Install (development):

    pip install --no-build-isolation -e .

Build isolation must be off because the extension ``blip_fast._C`` is compiled against the torch
already installed in the environment: torch must be importable when this file runs (an isolated
build environment would fetch some other torch, or none). Environment switches:

    BLIP_FAST_BUILD_EXT=0         skip the native extension; the package works without it
    BLIP_FAST_CUDA_ARCHS="9.0"    CUDA architectures, ";"- or ","-separated, "+PTX" to add PTX
                                  (default 9.0 = sm_90, H100)

The extension is a CUDAExtension (csrc/*.cpp + csrc/*.cu) when torch was built with CUDA and a
CUDA toolkit is found (CUDA_HOME), else a CppExtension with the CPU sources only. CMakeLists.txt
builds the same sources into the same module.

Packaging: the top-level ``kernels/`` directory is shipped as ``blip_fast.kernels`` through
``package_dir``; no top-level ``kernels`` package is installed (that name belongs to another
PyPI project). Editable installs use setuptools' default ("lenient") mode, whose import hook maps
``blip_fast.kernels`` to ``kernels/`` without putting the repository root on ``sys.path``; do not
use ``editable_mode=compat``, which would add the root and make ``import kernels`` work.
"""

import os

from setuptools import find_packages, setup

SOURCES_CPU = ["csrc/blip_fast_ext.cpp", "csrc/hard_negatives_cpu.cpp"]
SOURCES_CUDA = ["csrc/hard_negatives.cu"]


def _cuda_arch_flags(archs: str) -> list[str]:
    """'8.0;9.0+PTX' -> nvcc -gencode flags (sm_80, sm_90 and compute_90 PTX)."""
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        number = arch.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    if not flags:
        raise ValueError(f"BLIP_FAST_CUDA_ARCHS names no architecture: {archs!r}")
    return flags


def native_extensions():
    """(ext_modules, cmdclass) for blip_fast._C, or nothing when BLIP_FAST_BUILD_EXT=0."""
    if os.environ.get("BLIP_FAST_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        raise RuntimeError(
            "building blip_fast._C needs torch importable at build time: install torch first, then "
            "`pip install --no-build-isolation -e .` (or set BLIP_FAST_BUILD_EXT=0 to skip the extension)"
        ) from exc

    cxx_flags = ["-O3"]
    if torch.version.cuda is not None and CUDA_HOME is not None:
        archs = os.environ.get("BLIP_FAST_CUDA_ARCHS", "9.0")
        extension = CUDAExtension(
            name="blip_fast._C",
            sources=SOURCES_CPU + SOURCES_CUDA,
            define_macros=[("BLIP_FAST_WITH_CUDA", None)],
            # Explicit -gencode flags: torch then adds no architecture list of its own.
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"] + _cuda_arch_flags(archs)},
        )
    else:
        extension = CppExtension(
            name="blip_fast._C", sources=SOURCES_CPU, extra_compile_args={"cxx": cxx_flags}
        )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = native_extensions()

setup(
    name="blip-fast",
    version="0.1.0",
    description="A fast implementation of BLIP (Li et al. 2022)",
    python_requires=">=3.10",
    packages=find_packages(include=["blip_fast*"]) + ["blip_fast.kernels"],
    package_dir={"blip_fast.kernels": "kernels"},
    package_data={"blip_fast": ["text/bert-base-uncased-vocab.txt", "configs/*.yaml"]},
    install_requires=[
        "torch>=2.11",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "pyyaml>=6",
        "numpy",
        "pillow",
        "tqdm",
        "tensorboard",  # pretraining writes TensorBoard events next to metrics.jsonl
    ],
    extras_require={
        # numpy < 2.4: Triton 3.6's interpreter, which runs the kernels in CI, takes a loop bound read from memory
        # (the packed attention's sequence lengths) as a 1-element array, and NumPy 2.4 no longer converts those
        "test": ["pytest>=8", "transformers==5.17.0", "ruff", "matplotlib", "numpy<2.4", "pycocoevalcap==1.2",
                 "av==18.1.0"],
        # COCO caption metrics (blip_fast.evaluation.caption_metrics); PTBTokenizer, METEOR and SPICE also need Java
        "eval": ["pycocoevalcap==1.2"],
        "bench": ["matplotlib"],  # plots of `python benchmarks/report.py`
        "triton": ["triton==3.6.0"],
        # DALI's CUDA 13 wheel also runs CPU-only pipelines (device_id=None): CI tests those
        "dali": ["nvidia-dali-cuda130==2.4.0"],
        # video retrieval (blip_fast.data.video): PyAV decodes the videos, and counts their frames for DALI too
        "video": ["av==18.1.0"],
    },
    entry_points={"console_scripts": ["blip-fast = blip_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
