from vr.cli import entry

entry()
