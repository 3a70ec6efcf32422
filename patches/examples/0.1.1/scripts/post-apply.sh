#!/bin/sh
# Post hook: runs after the health gate, from the new release's directory. A non-zero exit
# rolls the patch back. Here: the rendered haproxy config carries the new header, if the
# router balances HTTP at all.
set -eu
config="$VR_CONFIG_DIR/haproxy/haproxy.cfg"
if [ -f "$config" ] && grep -q "mode http" "$config"; then
    grep -q "X-Vr-Release $VR_TO_VERSION" "$config"
fi
echo "release $VR_TO_VERSION in place (was $VR_FROM_VERSION)"
