"""d2v_plugin: fine-tune Data2Vec2 image encoders (full and distilled) with fairseq."""
from pathlib import Path

from setuptools import find_packages, setup

# fairseq-fixed==0.12.3.1 is needed too but is not listed: its dependency list pulls
# torchaudio and moves torch. Install it afterwards with
#   pip install --no-deps --no-build-isolation fairseq-fixed==0.12.3.1
# (the Makefile does this; see requirements-fairseq.txt).
requirements = [
    line.strip()
    for line in (Path(__file__).parent / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="d2v_plugin",
    version="0.1.0",
    description="fairseq user-dir plugin: fine-tune Data2Vec2 image encoders and distilled students on image classification",
    packages=find_packages(include=["d2v_plugin", "d2v_plugin.*"]),
    py_modules=["d2v_plugin_quiet"],  # stdlib only: also run at start-up from d2v_plugin_quiet.pth
    python_requires=">=3.11,<3.12",
    install_requires=requirements,
)
