"""``python -m sslseg``: the same command line as the ``sslseg`` script."""

from sslseg.cli import main

raise SystemExit(main())
