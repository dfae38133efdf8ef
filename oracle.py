"""`python oracle.py ...`: the `lsg-oracle` command run from a checkout (`lsg.cli.oracle`)."""

from lsg.cli.oracle import main

if __name__ == "__main__":
    main()
