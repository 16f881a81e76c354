"""`python -m rbeed` runs the daemon's command line."""

from .main import main

raise SystemExit(main())
