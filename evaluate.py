"""`python evaluate.py ...`: the `lsg-evaluate` command run from a checkout (`lsg.cli.evaluate`)."""

from lsg.cli.evaluate import main

if __name__ == "__main__":
    main()
