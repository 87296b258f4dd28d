"""Kept for tools and habits that run ``setup.py``; everything (metadata,
dependencies, extras, commands) is in pyproject.toml."""
from setuptools import setup

setup()
