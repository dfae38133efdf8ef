"""`python eval.py ...`: the `lsg-eval` command run from a checkout (`lsg.cli.evaluate`)."""

from lsg.cli.evaluate import main

if __name__ == "__main__":
    main()
