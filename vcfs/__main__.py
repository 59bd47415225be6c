"""Allows ``python -m vcfs``; the daemonising ``vcfs mount`` re-executes itself this way."""

from vcfs.cli import main

raise SystemExit(main())
