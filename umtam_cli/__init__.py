"""The umtam command line: thin wrappers that parse flags, call the library, render."""
