"""The command line: the app, its shared options, one module per command, the converter's commands."""
