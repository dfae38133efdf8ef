"""`python compare.py ...`: the `lsg-compare` command run from a checkout (`lsg.cli.compare`)."""

from lsg.cli.compare import main

if __name__ == "__main__":
    main()
