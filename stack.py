"""`python stack.py ...`: the `lsg-stack` command run from a checkout (`lsg.cli.stack`)."""

from lsg.cli.stack import main

if __name__ == "__main__":
    main()
