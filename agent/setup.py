"""The agent alone, for GEO servers: `pip install ./agent` (or a wheel built from it) brings ganymede-agent
and pymysql, nothing of the server (luigi, tornado, pymongo, boto3). The repository's top-level setup.py
still ships the same package with the server, for the tests and for a server that is also a GEO."""
import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "ganymede_agent" / "__init__.py").read_text(), re.M).group(1)

setup(
    name="ganymede-agent",
    version=VERSION,
    description="Ganymede GEO agent: the hour's statistics from the GEO database, archived, spooled and delivered",
    python_requires=">=3.11",
    packages=["ganymede_agent"],
    package_data={"ganymede_agent": ["agent.cfg.sample"]},
    install_requires=["pymysql>=1.1,<2"],
    entry_points={"console_scripts": ["ganymede-agent=ganymede_agent.cli:main"]},
)
