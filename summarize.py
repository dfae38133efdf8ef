"""`python summarize.py ...`: the `lsg-summarize` command run from a checkout (`lsg.cli.summarize`)."""

from lsg.cli.summarize import main

if __name__ == "__main__":
    main()
