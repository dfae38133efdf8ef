"""`python train.py ...`: the `lsg-train` command run from a checkout (`lsg.cli.train`)."""

from lsg.cli.train import main

if __name__ == "__main__":
    main()
