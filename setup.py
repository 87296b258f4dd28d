from setuptools import find_packages, setup

with open("README.md") as f:
    long_description = f.read()

setup(
    name="distributed",
    version="0.1.0",
    description="Distributed computing on a Tornado center/worker network",
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["distributed", "distributed.*"]),
    # the dashboard's page, script and style, served by the center itself
    package_data={"distributed.dashboard": ["static/*"]},
    python_requires=">=3.9",
    install_requires=[
        "tornado>=6.1",
        "cloudpickle>=2.0",
        "toolz>=0.11",
        "psutil>=5.8",
        "numpy>=1.21",
        "pandas>=1.3",
        # Decodes the message header without pickle (see docs/protocol.md).
        "msgpack>=1.0",
        # Makes remote tracebacks picklable so errors re-raise with them.
        "tblib>=1.7",
        # Hashes big arrays for keys at memory speed (sha1 is 15x slower).
        "xxhash>=3.0",
        # Writes the dashboard's /metrics in the Prometheus text format
        # (escaping, types, HELP lines) instead of a hand-made copy of it.
        "prometheus_client>=0.12",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout>=2.1",
            "hypothesis>=6",
            # dask core only (never dask.distributed: it is also named
            # `distributed`); tests run dask.array/dataframe graphs on our cluster
            "dask[array,dataframe]>=2025.1",
            # makes a throw-away CA and certificates for the TLS tests
            "cryptography>=3.1",
            # drives the system's headless Chromium in the dashboard tests
            "playwright>=1.30",
            # a real Jupyter kernel: forwarded task output lands under the cell
            # that ran the task (tests/test_logs.py)
            "ipykernel>=6",
            "jupyter_client>=7",
            # run the notebooks of docs/examples in a real kernel and check
            # their outputs (tests/test_notebooks.py)
            "nbclient>=0.7",
            "nbformat>=5.7",
        ],
    },
    entry_points={
        "console_scripts": [
            "dcenter=distributed.cli.dcenter:main",
            "dworker=distributed.cli.dworker:main",
            # a center and workers on other hosts over SSH; dcluster: its 2016 name
            "dssh=distributed.cli.dssh:main",
            "dcluster=distributed.cli.dssh:main",
            "dslurm=distributed.cli.dslurm:main",
        ],
    },
)
