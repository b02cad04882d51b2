"""``python -m globeflow.apps.cli``: the ``globeflow`` command."""

from globeflow.apps.cli import main

main()
