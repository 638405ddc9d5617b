"""omirror: live, symmetric mirroring of directory trees across Linux hosts."""

__version__ = "0.1.0"
