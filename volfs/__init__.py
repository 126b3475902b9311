"""volfs: named, persistent, shared volumes for containers and services, served over FUSE."""

__version__ = "0.1.0"
