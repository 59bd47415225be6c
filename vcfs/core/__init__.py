"""The pure core: the v1 on-disk format and block codec. Bytes in, bytes out; no I/O."""
