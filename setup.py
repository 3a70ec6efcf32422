from pathlib import Path

from setuptools import find_packages, setup

configs = [
    (f"share/vr/{directory.as_posix()}", [str(p) for p in sorted(directory.iterdir()) if p.is_file()])
    for directory in sorted({p.parent for p in Path("configs").rglob("*") if p.is_file()})
]

setup(
    name="vr",
    version="0.1.0",
    description="The software stack of a virtual router appliance",
    packages=find_packages(include=["vr", "vr.*"]),
    python_requires=">=3.11",
    install_requires=[
        "pydantic>=2.5",
        "jinja2>=3.1",
        "pyroute2>=0.7",
        "supervisor>=4.2",
        "dnspython>=2.4",
        "requests>=2.28",
        "watchdog>=3.0",
        "vici>=5.9",
        "pip-nftables>=1.0",
        "cryptography>=42",  # load-balancer certificates: parse, match key, expiry
        "aiohttp>=3.9",  # the daemon's local API and the manager's HTTPS agent (vr.control.agent)
        "prometheus-client>=0.17",  # the daemon's GET /metrics (vr.control.metrics)
    ],
    data_files=configs,
    entry_points={"console_scripts": ["vr = vr.cli:entry"]},
)
