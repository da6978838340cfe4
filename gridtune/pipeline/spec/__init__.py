"""The grid: its spec, the options every form and flag shares, the project file it lives in."""
