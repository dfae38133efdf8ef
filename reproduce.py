"""`python reproduce.py ...`: the `lsg-reproduce` command run from a checkout (`lsg.cli.reproduce`)."""

from lsg.cli.reproduce import main

if __name__ == "__main__":
    main()
