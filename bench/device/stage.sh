#!/usr/bin/env bash
# On the device: keep what this call carried (a folder made by pack.sh) in /tmp/stage, since
# the next call carries another folder and its copy of the tree replaces this one's.
set -euo pipefail
mkdir -p /tmp/stage && cp "$1"/* /tmp/stage/ && du -sh /tmp/stage
