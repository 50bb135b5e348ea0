"""The links data crosses: process groups and collectives (more links arrive with later layers)."""

from ferry.comm.group import ParallelGroup

__all__ = ["ParallelGroup"]
