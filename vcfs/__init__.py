"""vcfs: a transparent encrypting FUSE filesystem for recording platforms."""

__version__ = "0.1.0"
