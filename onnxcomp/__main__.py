"""`python -m onnxcomp` is the `onnxcomp` command."""
from .cli import main

if __name__ == "__main__":
    main()
