#!/bin/sh
# The container's entry point, then the command (memserve serve).
#  - MEMSERVE_ADMIN_KEY_FILE: read the bootstrap admin key from this file (a compose or Kubernetes secret), so
#    the key is never written in compose.yaml or shown by `docker inspect`.
#  - MEMSERVE_DEMO_MODEL: make the tiny demo model at this path on the first start (deploy/memserve.yaml serves
#    it), so `docker compose up` answers before any real model is configured. Unset it when serving your own.
set -eu

if [ -n "${MEMSERVE_ADMIN_KEY_FILE:-}" ]; then
    if [ ! -r "$MEMSERVE_ADMIN_KEY_FILE" ]; then
        echo "memserve: MEMSERVE_ADMIN_KEY_FILE=$MEMSERVE_ADMIN_KEY_FILE cannot be read by user $(id -u): create it (README.md, 'Run it as a service') and make it readable, or unset the variable" >&2
        exit 1
    fi
    MEMSERVE_ADMIN_KEY="$(cat "$MEMSERVE_ADMIN_KEY_FILE")"
    if [ -z "$MEMSERVE_ADMIN_KEY" ]; then
        echo "memserve: $MEMSERVE_ADMIN_KEY_FILE is empty: write the admin key into it (one line)" >&2
        exit 1
    fi
    export MEMSERVE_ADMIN_KEY
    unset MEMSERVE_ADMIN_KEY_FILE
fi

if [ -n "${MEMSERVE_DEMO_MODEL:-}" ] && [ ! -e "$MEMSERVE_DEMO_MODEL/config.json" ]; then
    echo "memserve: making the demo model at $MEMSERVE_DEMO_MODEL (first start only)" >&2
    memserve demo-model "$MEMSERVE_DEMO_MODEL" --size tiny >&2
fi

exec "$@"
