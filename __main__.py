"""`python -m comfyui_chai ...`: the headless command line (see cli/)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
