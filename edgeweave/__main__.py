"""`python -m edgeweave` is the same as the `edgeweave` console script."""

from edgeweave.cli import main

if __name__ == "__main__":
    main()
