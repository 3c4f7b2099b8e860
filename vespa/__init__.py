"""Vespa: the serverless GPU worker for Vast.ai."""

__version__ = "0.1.0"
