#!/usr/bin/env bash
# Horovod Elastic host discovery from a hosts file: prints one "host:slots" line per usable host.
# horovodrun runs this every few seconds; edit the file to add or remove hosts while training runs.
#   HVDTRAIN_HOSTS_FILE=hosts.txt horovodrun --gloo --min-np 1 --max-np 4 \
#       --host-discovery-script scripts/discover-hosts.sh hvdtrain train --elastic ...
# File format: "host:slots" or "host" (1 slot) per line; blank lines and # comments are ignored.
set -euo pipefail
file="${HVDTRAIN_HOSTS_FILE:-hosts.txt}"
[ -r "$file" ] || { echo "discover-hosts.sh: cannot read hosts file '$file' (set HVDTRAIN_HOSTS_FILE)" >&2; exit 1; }
sed -e 's/#.*//' -e 's/[[:space:]]//g' "$file" | awk 'NF { print (index($0, ":") ? $0 : $0 ":1") }'
