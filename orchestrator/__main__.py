"""`python -m orchestrator` is the same as the `sae-rollback` console script."""

from orchestrator.cli import main

raise SystemExit(main())
