"""`python -m gridtune …`: the same command line as `gridtune …`."""

from gridtune.tui.cli import main

if __name__ == "__main__":
    main(prog_name="gridtune")
