"""``python -m studioserve`` is the ``studio`` command."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    main()
