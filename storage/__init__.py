"""The run folder: its on-disk format (``format``), its one writer (``writer``,
used only by the daemon) and its read-only reader (``reader``, used by ``kobo``
and by users)."""
