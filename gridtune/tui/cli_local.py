"""placeholder registered by cli.py; commands are added by their owners."""
