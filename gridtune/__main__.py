"""`python -m gridtune …`: the same command line as `gridtune …`."""

from gridtune.cli.main import main

if __name__ == "__main__":
    main(prog_name="gridtune")
