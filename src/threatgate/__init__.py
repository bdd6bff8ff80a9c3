"""threatgate: high-availability threat-intelligence matching for SIEM event streams."""

from threatgate._version import __version__

__all__ = ["__version__"]
