"""`python calibrate.py ...`: the `lsg-calibrate` command run from a checkout (`lsg.cli.calibrate`)."""

from lsg.cli.calibrate import main

if __name__ == "__main__":
    main()
