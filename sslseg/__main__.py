"""``python -m sslseg``: the same command line as the ``sslseg`` script."""

from sslseg.app.cli import main

raise SystemExit(main())
