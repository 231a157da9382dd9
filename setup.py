"""Install fastsoft. The C++ CPU backend (csrc/) is built here into fastsoft._C when torch is importable
(install with --no-build-isolation) and FASTSOFT_SKIP_EXT is not 1 at install time; otherwise it is built
just in time on first use from the shipped source (fastsoft/ops/cpp.py). FASTSOFT_SKIP_EXT=1 at run time
turns the backend off."""

import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("FASTSOFT_SKIP_EXT") != "1" and os.path.exists("csrc/softmax_kl.cpp"):
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # an isolated build environment without torch: JIT build on first use instead
        pass
    else:
        ext_modules = [
            CppExtension(
                "fastsoft._C",
                ["csrc/softmax_kl.cpp", "csrc/layers.cpp"],
                extra_compile_args=[
                    "-O3",
                    "-fopenmp",
                    "-fno-trapping-math",
                    "-fno-math-errno",
                ],  # as fastsoft/ops/cpp.py
                extra_link_args=["-fopenmp"],
            )
        ]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(
    name="fastsoft",
    version="0.1.0",
    description="Soft prompts learned by context compression, with fused softmax-KL kernels",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "fastsoft",
        *(f"fastsoft.{part}" for part in ("frozen", "data", "teacher", "train", "eval", "pipeline", "io", "ops")),
        "fastsoft.kernels",
        "fastsoft.csrc",
    ],
    package_dir={"fastsoft.kernels": "kernels", "fastsoft.csrc": "csrc"},
    package_data={"fastsoft.csrc": ["*.cpp", "*.h"]},  # the source the just-in-time build compiles
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "transformers>=5.17,<5.25",  # the versions the test suite ran on (5.17: the GPU image's; 5.24)
        "safetensors>=0.4",
        "tqdm",
        "numpy",
        "matplotlib",
        "gguf>=0.10",
        "accelerate>=1.0",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest>=8", "peft>=0.17", "ninja", "ruff>=0.6"],
        "bench": ["peft>=0.17", "matplotlib", "ninja"],
        "gpu": ["liger-kernel", "cut-cross-entropy"],
    },
    entry_points={"console_scripts": ["fastsoft=fastsoft.cli:main"]},
)
