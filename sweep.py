"""`python sweep.py ...`: the `lsg-sweep` command run from a checkout (`lsg.cli.sweep`)."""

from lsg.cli.sweep import main

if __name__ == "__main__":
    main()
