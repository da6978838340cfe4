"""The `gridtune` command line: every step the screens do, as commands. No Textual here."""
