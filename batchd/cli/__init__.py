"""The command line: argument parsing (main), commands, progress views, the demo."""
