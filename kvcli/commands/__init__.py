"""One module per command: parse flags, call the library, render the result."""
