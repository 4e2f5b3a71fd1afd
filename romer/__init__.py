"""ROMER: expert replacement and router calibration for MoE LLMs on simulated analog CIM arrays."""

__version__ = "0.1.0"
