"""Package build. Metadata lives in pyproject.toml; this file only adds the csrc/ extensions."""

from setuptools import setup

setup()
