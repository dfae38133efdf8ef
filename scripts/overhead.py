"""`python scripts/overhead.py ...`: the `lsg-overhead` command run from a checkout (`lsg.cli.overhead`)."""

from lsg.cli.overhead import main

if __name__ == "__main__":
    main()
