"""kobo: the user CLI over run folders."""
