#!/usr/bin/env python3
"""Build, quantize and pack kvcli's GGUF files.

    python tools/convert_gguf.py make-aux BASE -o AUX --layers 0-4 | --stride 4 [--no-last]
    python tools/convert_gguf.py calibrate BASE AUX -o PREDICTOR [--corpus PATH] [--tokens N]
    python tools/convert_gguf.py quantize IN OUT TYPE
    python tools/convert_gguf.py bundle --base B [--aux A --predictor P] -o DIR

The same commands as ``kvcli convert ...`` (installed with the package).
Every subcommand is a thin wrapper over kvcli's own functions (kvcli/cli/convert*.py), so
the converter and the kvcli commands share one implementation.
"""

from kvcli.cli.convert import main

if __name__ == "__main__":
    main()
