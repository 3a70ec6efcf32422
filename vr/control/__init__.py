"""The control plane: the monitor, alerts, status, the spool and the keeper of supervisord."""
