"""vr: the software stack of a virtual router appliance."""

__version__ = "0.1.0"
