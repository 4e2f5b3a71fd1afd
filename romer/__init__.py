"""ROMER: expert replacement and router calibration for MoE LLMs on simulated analog CIM arrays."""

from romer.core.numerics import pin_environment

pin_environment()  # before torch or numpy loads its kernels (romer/core/numerics.py)

__version__ = "0.1.0"
