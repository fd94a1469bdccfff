"""``python -m jupyter_swapserve.reference``: the reference engine's server."""

from .server import main

if __name__ == "__main__":
    main()
