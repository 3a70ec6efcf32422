"""The foundation: the document, settings, files, events, errors and the locks every layer uses."""
