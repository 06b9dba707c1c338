"""`python -m qmpguard`."""

from qmpguard.cli import main

raise SystemExit(main())
