"""`python eval.py ...`: the `lsg-eval` command run from a checkout (`lsg.cli.eval`)."""

from lsg.cli.eval import main

if __name__ == "__main__":
    main()
